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
 * Output: one line "insns: N" into out=FILE (or stderr), written when the guest exits.
 *
 * Per-function counts: `syms=FILE` names a text file of address ranges, one "START END NAME" line
 * each (hex START inclusive, END exclusive, sorted by START, not overlapping; runtime/insncount.py
 * writes it from the ELF's symbol table). Every instruction of a translated block is attributed to
 * the range holding its address (or to "?" outside all ranges), and the block adds, per range it
 * touches, that range's instruction count to the range's own counter (inline adds again, no
 * callback). Output then has one more line "fn N NAME" per range that ran, after "insns: N". */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
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
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, qemu_plugin_udata_cb_t, void *);

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;

static uint64_t count;
static int per_insn;
static char out_path[1024];

#define MAX_RANGES 65536
#define MAX_TB_RANGES 16
struct range { uint64_t lo, hi, count; char name[80]; };
static struct range *ranges;       /* sorted by lo; ranges[n_ranges] is "?" (outside all) */
static size_t n_ranges;

static size_t range_of(uint64_t addr)
{
    size_t lo = 0, hi = n_ranges;
    while (lo < hi) {              /* first range with lo > addr */
        size_t mid = (lo + hi) / 2;
        if (ranges[mid].lo <= addr) lo = mid + 1; else hi = mid;
    }
    return (lo > 0 && addr < ranges[lo - 1].hi) ? lo - 1 : n_ranges;
}

static int load_ranges(const char *path)
{
    FILE *f = fopen(path, "r");
    unsigned long long lo, hi;
    char name[80];
    if (!f || !(ranges = calloc(MAX_RANGES + 1, sizeof *ranges))) {
        fprintf(stderr, "bnnc insncount plugin: cannot read %s\n", path);
        if (f) fclose(f);
        return -1;
    }
    while (n_ranges < MAX_RANGES && fscanf(f, "%llx %llx %79s", &lo, &hi, name) == 3) {
        if (hi <= lo || (n_ranges && lo < ranges[n_ranges - 1].hi)) {
            fprintf(stderr, "bnnc insncount plugin: %s: ranges must be sorted, disjoint and "
                            "non-empty (at %s)\n", path, name);
            fclose(f);
            return -1;
        }
        ranges[n_ranges].lo = lo;
        ranges[n_ranges].hi = hi;
        snprintf(ranges[n_ranges].name, sizeof ranges[n_ranges].name, "%s", name);
        n_ranges++;
    }
    fclose(f);
    snprintf(ranges[n_ranges].name, sizeof ranges[n_ranges].name, "?");
    return 0;
}

static void attribute(struct qemu_plugin_tb *tb, size_t n)
{
    size_t idx[MAX_TB_RANGES], cnt[MAX_TB_RANGES], m = 0, i, j;
    for (i = 0; i < n; i++) {
        size_t r = range_of(qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, i)));
        for (j = 0; j < m && idx[j] != r; j++) {}
        if (j == m) {
            if (m == MAX_TB_RANGES) {      /* not seen in practice: a block is a few functions */
                r = n_ranges;
                for (j = 0; j < m && idx[j] != r; j++) {}
            }
            if (j == m) { idx[m] = r; cnt[m++] = 0; }
        }
        cnt[j]++;
    }
    for (j = 0; j < m; j++)
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64,
                                                 &ranges[idx[j]].count, cnt[j]);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t i, n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    if (ranges) attribute(tb, n);
    if (!per_insn) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &count, n);
        return;
    }
    for (i = 0; i < n; i++)
        qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i),
                                                   QEMU_PLUGIN_INLINE_ADD_U64, &count, 1);
}

static void on_guest_exit(qemu_plugin_id_t id, void *unused)
{
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    (void)id;
    (void)unused;
    size_t r;
    fprintf(f ? f : stderr, "insns: %llu\n", (unsigned long long)count);
    for (r = 0; ranges && r <= n_ranges; r++)
        if (ranges[r].count)
            fprintf(f ? f : stderr, "fn %llu %s\n", (unsigned long long)ranges[r].count,
                    ranges[r].name);
    if (f) fclose(f);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    int i;
    (void)info;
    for (i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "exact=on") || !strcmp(argv[i], "exact")) per_insn = 1;
        else if (!strncmp(argv[i], "out=", 4)) snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        else if (!strncmp(argv[i], "syms=", 5)) {
            if (load_ranges(argv[i] + 5)) return -1;
        }
        else {
            fprintf(stderr, "bnnc insncount plugin: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_guest_exit, NULL);
    return 0;
}
