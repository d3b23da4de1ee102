// LD_PRELOAD shim of benchmarks/isa_mask.py. That module copies ONNX Runtime's libraries with each `cpuid`
// instruction replaced by UD0 (0f ff), which no compiler emits; here the resulting SIGILL is caught, the real
// cpuid is run, and the feature bits named in ISA_MASK_CLEAR are cleared from its leaf-7 answer, so ONNX
// Runtime dispatches the kernels of a CPU without them. Any other SIGILL goes to whoever else asked for it
// (Python's faulthandler, under pytest) or kills the process as usual.
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

// Leaf 7 sub-leaf 0 EBX, ECX, EDX; sub-leaf 1 EAX, EDX: the registers that hold AVX-512, VNNI and AMX.
static unsigned clear_bits[5];
static struct sigaction chained;  // the SIGILL action the program set, run for faults that are not ours
static int installed;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

static void on_sigill(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (info->si_code != ILL_ILLOPN && info->si_code != ILL_ILLOPC) ip = NULL;  // raised, not a fault
    if (!ip || ip[0] != 0x0f || ip[1] != 0xff) {
        if (chained.sa_flags & SA_SIGINFO) {
            chained.sa_sigaction(sig, info, context);
        } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
            chained.sa_handler(sig);
        } else {
            struct sigaction dfl = {0};
            dfl.sa_handler = SIG_DFL;
            real_sigaction()(SIGILL, &dfl, NULL);
            raise(SIGILL);  // the default action, for a fault and for a raised signal alike
        }
        return;
    }
    unsigned leaf = (unsigned)regs[REG_RAX], sub = (unsigned)regs[REG_RCX], a, b, c, d;
    __cpuid_count(leaf, sub, a, b, c, d);
    if (leaf == 7 && sub == 0) {
        b &= ~clear_bits[0];
        c &= ~clear_bits[1];
        d &= ~clear_bits[2];
    } else if (leaf == 7 && sub == 1) {
        a &= ~clear_bits[3];
        d &= ~clear_bits[4];
    }
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

// The program's own SIGILL handlers are kept aside, not installed, so ours stays first.
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGILL || !installed) return real_sigaction()(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

__attribute__((constructor)) static void install(void) {
    const char *spec = getenv("ISA_MASK_CLEAR");
    if (!spec || sscanf(spec, "%x,%x,%x,%x,%x", &clear_bits[0], &clear_bits[1], &clear_bits[2], &clear_bits[3],
                        &clear_bits[4]) != 5) {
        fprintf(stderr, "isa_mask: ISA_MASK_CLEAR must be five comma-separated hex words (got %s)\n",
                spec ? spec : "nothing");
        abort();
    }
    struct sigaction ours = {0};
    ours.sa_sigaction = on_sigill;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;
    real_sigaction()(SIGILL, &ours, &chained);
    installed = 1;
}
