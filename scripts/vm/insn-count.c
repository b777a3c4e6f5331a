/*
 * insn-count: a QEMU TCG plugin of ours for the guest harness. It counts
 * the guest instructions every vCPU executes, and the `syscall`
 * instructions among them, and prints the running totals
 *
 *     RBMARK insns=N syscalls=M
 *
 * (to QEMU's log: run with `-d plugin`) each time the guest executes the
 * marker `nopl 0x52424c4b(%rax)` (tests/vm/mark.rs). The cost harness,
 * scripts/bench/nvme-cost.sh, turns the differences between markers into
 * instructions and system calls per I/O. Instructions are counted when a
 * translation block starts, so a block left early by an interrupt counts
 * whole: an error of a few instructions per interrupt.
 *
 * Built against QEMU 7.2's plugin ABI (version 1), declared here from its
 * documentation: the functions below are resolved in the QEMU binary.
 *
 *     gcc -shared -fPIC -O2 -o insn-count.so insn-count.c
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                                   enum qemu_plugin_cb_flags flags, void *userdata);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
extern size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_outs(const char *string);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_CPUS 64
/* One slot per vCPU: each vCPU thread adds only to its own. */
static uint64_t insns[MAX_CPUS];
static uint64_t syscalls[MAX_CPUS];
static const uint8_t MARK[7] = { 0x0f, 0x1f, 0x80, 0x4b, 0x4c, 0x42, 0x52 };

static void tb_exec(unsigned int cpu, void *n)
{
    insns[cpu % MAX_CPUS] += (uintptr_t)n;
}

static void syscall_exec(unsigned int cpu, void *unused)
{
    (void)unused;
    syscalls[cpu % MAX_CPUS]++;
}

static void mark_exec(unsigned int cpu, void *unused)
{
    uint64_t i = 0, s = 0;
    char line[96];
    (void)cpu;
    (void)unused;
    for (int k = 0; k < MAX_CPUS; k++) {
        i += insns[k];
        s += syscalls[k];
    }
    snprintf(line, sizeof line, "RBMARK insns=%llu syscalls=%llu\n", (unsigned long long)i, (unsigned long long)s);
    qemu_plugin_outs(line);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)n);
    for (size_t k = 0; k < n; k++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, k);
        const uint8_t *b = qemu_plugin_insn_data(insn);
        size_t len = qemu_plugin_insn_size(insn);
        if (len == 2 && b[0] == 0x0f && b[1] == 0x05) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, syscall_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
        } else if (len == sizeof MARK && memcmp(b, MARK, sizeof MARK) == 0) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, mark_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
    }
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                                               char **argv)
{
    (void)info;
    (void)argc;
    (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    return 0;
}
