/* Drives csrc/sig.c under AddressSanitizer and UBSan (tests/test_signatures.py builds and runs it):
 *   sig_fuzz BLOB DATA SEED ROUNDS
 * builds the blob in both modes and scans DATA as one block and as streams in several chunkings,
 * then builds ROUNDS randomly mutated copies of the blob and scans DATA with whatever builds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sig.h"

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc(n > 0 ? (size_t)n : 1);
    if (!p || fread(p, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(p);
        return NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return p;
}

static long exercise(const unsigned char *blob, size_t blen, const unsigned char *data, size_t dlen)
{
    struct vn_sig_match out[256];
    struct vn_sig_build_error errs[8];
    uint32_t nerrs;
    long found = 0;
    int rc;
    static const uint32_t chunks[] = {1, 7, 1460, 70000};
    for (int mode = 0; mode < 2; mode++) {
        struct vn_sig_db *db = vn_sig_db_build(blob, blen, mode, 64, 1 << 20, errs, 8, &nerrs, &rc);
        if (!db)
            continue;
        if (mode == VN_SIG_MODE_BLOCK) {
            int n = vn_sig_scan_block(db, data, dlen, out, 256);
            found += n > 0 ? n : 0;
        } else {
            for (size_t c = 0; c < sizeof chunks / sizeof *chunks; c++) {
                struct vn_sig_stream *st = vn_sig_stream_open(db, &rc);
                if (!st)
                    break;
                for (size_t off = 0; off < dlen; off += chunks[c]) {
                    size_t n = dlen - off < chunks[c] ? dlen - off : chunks[c];
                    int m = vn_sig_stream_scan(db, st, data + off, n, out, 256);
                    found += m > 0 ? m : 0;
                }
                int m = vn_sig_stream_close(db, st, out, 256);
                found += m > 0 ? m : 0;
            }
        }
        vn_sig_db_free(db);
    }
    return found;
}

int main(int argc, char **argv)
{
    if (argc != 5)
        return 2;
    size_t blen, dlen;
    unsigned char *blob = slurp(argv[1], &blen), *data = slurp(argv[2], &dlen);
    if (!blob || !data)
        return 2;
    srand((unsigned)atoi(argv[3]));
    long rounds = atol(argv[4]);
    printf("matches %ld\n", exercise(blob, blen, data, dlen));
    unsigned char *m = malloc(blen);
    for (long r = 0; r < rounds && m; r++) {
        memcpy(m, blob, blen);
        for (int k = 0, n = 1 + rand() % 4; k < n; k++)
            m[(size_t)rand() % blen] = (unsigned char)rand();
        size_t cut = rand() % 8 == 0 ? (size_t)rand() % blen : blen;
        exercise(m, cut, data, dlen);
    }
    free(m);
    free(blob);
    free(data);
    return 0;
}
