/* bnnc's QEMU TCG plugin: counts executed guest instructions (plugin API v1, QEMU 7.2 as in Debian 12).
 *
 * Debian ships no qemu-plugin.h and no prebuilt plugins, but its QEMU is built with plugin support and
 * exports the qemu_plugin_* symbols, so the few API v1 declarations used are written out here.
 * runtime/insncount.py builds this file (cc -O2 -shared -fPIC) and passes it to qemu-aarch64 /
 * qemu-system-arm as `-plugin libbnnc_insncount.so,out=FILE`.
 *
 * Counting: every translated block adds its instruction count to one 64-bit counter each time it runs
 * (an inline add, no callback). A block left early by an exception would be over-counted by the rest
 * of the block; `exact=on` registers one inline add per instruction instead (slower, same totals in
 * bnnc's runs). One vCPU (qemu-user single thread / the single M-profile core): no atomics needed.
 * Output: one line "insns: N" into out=FILE (or stderr), written when the guest exits. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t, void *);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, qemu_plugin_vcpu_tb_trans_cb_t);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op, void *,
                                              uint64_t);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *, enum qemu_plugin_op, void *,
                                                uint64_t);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, qemu_plugin_udata_cb_t, void *);

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;

static uint64_t count;
static int per_insn;
static char out_path[1024];

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t i, n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    if (!per_insn) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &count, n);
        return;
    }
    for (i = 0; i < n; i++)
        qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i),
                                                   QEMU_PLUGIN_INLINE_ADD_U64, &count, 1);
}

static void on_exit(qemu_plugin_id_t id, void *unused)
{
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    (void)id;
    (void)unused;
    fprintf(f ? f : stderr, "insns: %llu\n", (unsigned long long)count);
    if (f) fclose(f);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    int i;
    (void)info;
    for (i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "exact=on") || !strcmp(argv[i], "exact")) per_insn = 1;
        else if (!strncmp(argv[i], "out=", 4)) snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        else {
            fprintf(stderr, "bnnc insncount plugin: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
