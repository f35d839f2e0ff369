/* kvmpy sandbox guest runtime: the host-call ABI seen from freestanding C.
 *
 * A guest function is an ordinary C function, `long f(long a0, ..., long a5)`
 * (System V AMD64 calling convention: arguments in rdi, rsi, rdx, rcx, r8, r9,
 * result in rax). kvmpy calls it at guest CPL3 with IOPL 0, so the payload
 * cannot reach the host's fault-report ports: only kvmpy's CPL0 exception
 * handlers can, and the host checks that a report came from them.
 *
 * A host call stores its number to the doorbell (KVMPY_DOORBELL_ADDR), a
 * user page that no guest memory backs: the store exits to the host as MMIO
 * directly from CPL3. (`outb nr, KVMPY_HOSTCALL_PORT` works too: it raises
 * #GP, which kvmpy's handler forwards, at the cost of a switch to CPL0.)
 *
 * The ABI block sits at a fixed guest address (KVMPY_ABI_ADDR). A host call
 * writes its arguments there, does `outb nr, KVMPY_HOSTCALL_PORT`, and reads
 * the host's answer from `ret`. These constants must match kvmpy/sandbox.py.
 */
#ifndef KVMPY_GUEST_H
#define KVMPY_GUEST_H

typedef unsigned long size_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;

#define KVMPY_ABI_ADDR 0x200000UL
#define KVMPY_HOSTCALL_PORT 0xE0
#define KVMPY_DOORBELL_ADDR 0xC0000000UL

/* Host-call numbers; 16 and up are the caller's own (`hostcalls={nr: fn}`). */
#define KVMPY_HC_RETURN 0 /* the function returned: rax (doorbell) or ret (port) holds the result */
#define KVMPY_HC_WRITE 1  /* append args[0..1] = (pointer, length) to the output */
#define KVMPY_HC_ABORT 2  /* give up: args[0] = code, args[1..2] = message */
#define KVMPY_HC_USER 16

struct kvmpy_abi {
    uint64_t magic;      /* "KVMPYABI" */
    uint64_t args[6];    /* host-call arguments */
    int64_t ret;         /* host-call answer; the function's result on RETURN */
    uint64_t heap_start; /* first free byte after the image and the byte arguments */
    uint64_t heap_end;   /* the stack's lowest byte: the memory limit for data */
};

#define KVMPY_ABI ((volatile struct kvmpy_abi *)KVMPY_ABI_ADDR)

static inline long kvmpy_hostcall(unsigned nr, long a0, long a1, long a2, long a3) {
    volatile struct kvmpy_abi *abi = KVMPY_ABI;
    abi->args[0] = (uint64_t)a0;
    abi->args[1] = (uint64_t)a1;
    abi->args[2] = (uint64_t)a2;
    abi->args[3] = (uint64_t)a3;
    __asm__ volatile("movb %%al, (%1)" : : "a"(nr), "r"(KVMPY_DOORBELL_ADDR) : "memory");
    return abi->ret;
}

/* Send bytes to the host (collected in RunResult.output). */
static inline void kvmpy_write(const void *data, size_t len) {
    kvmpy_hostcall(KVMPY_HC_WRITE, (long)data, (long)len, 0, 0);
}

/* Stop with an error the host raises as GuestAbort(code, message). */
static inline __attribute__((noreturn)) void kvmpy_abort(long code, const char *msg) {
    size_t n = 0;
    while (msg && msg[n])
        n++;
    kvmpy_hostcall(KVMPY_HC_ABORT, code, (long)msg, (long)n, 0);
    for (;;)
        ;
}

/* A bump allocator over the guest's free memory; NULL once the limit is reached. */
void *kvmpy_alloc(size_t size);

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

#endif
