/* Watches (or writes) one 64-bit index word in a shared memfd, as the NI does with a
 * ring's words: "watch FD N" loads it until it reaches N and prints how many loads saw
 * it go back (a torn store); "count FD N" stores 1..N. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int fd = atoi(argv[2]);
    uint64_t n = strtoull(argv[3], NULL, 10);
    uint64_t *word = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (word == MAP_FAILED)
        return 2;
    if (!strcmp(argv[1], "count")) {
        for (uint64_t i = 1; i <= n; i++)
            __atomic_store_n(word, i, __ATOMIC_RELEASE);
        return 0;
    }
    uint64_t last = 0, back = 0;
    while (last < n) {
        uint64_t v = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if (v < last)
            back++;
        else
            last = v;
    }
    printf("%llu\n", (unsigned long long)back);
    return 0;
}
