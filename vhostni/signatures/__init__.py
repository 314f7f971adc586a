"""SafeCard's payload stage: Suricata-syntax signatures (rules.py parses and compiles them,
sans-I/O) matched by Hyperscan in C (csrc/sig.c, driven through engine.py)."""
