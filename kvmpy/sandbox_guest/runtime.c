/* The few library functions freestanding C still needs: gcc emits calls to
 * memcpy/memset/memmove/memcmp for struct copies and loops even with
 * -ffreestanding (GCC manual, "Standards"), plus kvmpy_alloc. */
#include "kvmpy_guest.h"

void *memcpy(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        while (n--)
            *d++ = *s++;
    } else {
        while (n--)
            d[n] = s[n];
    }
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

void *kvmpy_alloc(size_t size) {
    volatile struct kvmpy_abi *abi = KVMPY_ABI;
    uint64_t start = (abi->heap_start + 15) & ~15UL;
    if (size > abi->heap_end || start > abi->heap_end - size)
        return 0;
    abi->heap_start = start + size;
    return (void *)start;
}
