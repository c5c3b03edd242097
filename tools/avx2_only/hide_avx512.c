/* Hide AVX-512 from a process and its children, as a hypervisor that masks it does: loaded by LD_PRELOAD
 * (tools/avx2_only/run), it turns on the kernel's CPUID faulting (arch_prctl ARCH_SET_CPUID 0), so that every
 * cpuid instruction traps, and answers it with the CPU's own values less the AVX-512 feature bits (leaf 7)
 * and the AVX-512 register state (leaf 0xd). onnxruntime, numpy and the other libraries that choose their
 * kernels by cpuid then choose their AVX2 ones. xgetbv is not trapped; code that trusts it alone still sees
 * the state enabled (the libraries here check cpuid first).
 *
 * A SIGSEGV handler installed later (Python's faulthandler, pytest) is kept behind this one: sigaction() and
 * signal() for SIGSEGV are intercepted, and a fault that is not a cpuid goes to that handler, or ends the
 * process as it would have. HIDE_AVX512_REPORT=1 prints how many cpuid instructions were answered. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction;
static struct sigaction next_handler; /* what the process asked for SIGSEGV; SIG_DFL until it asks */
static volatile unsigned long answered;

static long cpuid_faulting(int off) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, off ? 0 : 1); }

static void masked(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        /* EBX: avx512f dq ifma pf er cd bw vl; ECX: vbmi vbmi2 vnni bitalg vpopcntdq; EDX: 4vnniw 4fmaps
         * vp2intersect fp16 */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
    } else if (leaf == 7 && sub == 1) {
        *a &= ~(1u << 5); /* avx512_bf16 */
    } else if (leaf == 0xd && sub == 0) {
        *a &= ~0xe0u; /* opmask, ZMM_Hi256, Hi16_ZMM state */
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) { /* cpuid */
        uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
        cpuid_faulting(0);
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
        cpuid_faulting(1);
        masked(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a, r[REG_RBX] = b, r[REG_RCX] = c, r[REG_RDX] = d;
        r[REG_RIP] += 2;
        answered++;
        return;
    }
    if (next_handler.sa_flags & SA_SIGINFO) {
        next_handler.sa_sigaction(sig, info, context);
    } else if (next_handler.sa_handler != SIG_DFL && next_handler.sa_handler != SIG_IGN) {
        next_handler.sa_handler(sig);
    } else { /* a real fault: return to it with the default action, which ends the process */
        struct sigaction dfl = {0};
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV) return real_sigaction(sig, act, old);
    if (old) *old = next_handler;
    if (act) next_handler = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act = {0}, old;
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

static void report(void) {
    if (getenv("HIDE_AVX512_REPORT")) fprintf(stderr, "hide_avx512: %lu cpuid instructions answered\n", answered);
}

__attribute__((constructor)) static void start(void) {
    struct sigaction act = {0};
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    next_handler.sa_handler = SIG_DFL;
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    if (real_sigaction(SIGSEGV, &act, NULL) != 0 || cpuid_faulting(1) != 0) {
        perror("hide_avx512: CPUID faulting is not available here (arch_prctl ARCH_SET_CPUID)");
        _exit(3);
    }
    atexit(report);
}
