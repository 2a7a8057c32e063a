// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * chadthrottle: per-process and per-cgroup rate limits on cgroup_skb hooks.
 *
 * Mechanism only; every policy (who is limited, how fast, burst sizes) is written into the
 * maps by the daemon.  Attribution: a socket is tagged with the tgid that created it
 * (cgroup/sock_create, socket-local storage; accepted sockets inherit the listener's tag via
 * BPF_F_CLONE; sockets older than the daemon are tagged from user space).  A process belongs
 * to at most one budget (proc_budget); children inherit their parent's budget at fork.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "throttle.h"

#define NSEC_PER_SEC 1000000000ULL
#define USEC_PER_SEC 1000000ULL
#define NSEC_PER_USEC 1000ULL

/* cgroup_skb verdicts */
#define CT_DROP 0
#define CT_PASS 1
#define CT_DROP_CN 2 /* egress only: drop and tell TCP to reduce its window */

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct ct_sk_tag);
} sk_tag SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_MEMBERS);
	__type(key, __u32);   /* tgid */
	__type(value, __u32); /* budget id */
} proc_budget SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_LIMITS);
	__type(key, __u32); /* budget id */
	__type(value, struct ct_limit);
} limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_UNITS);
	__type(key, __u64); /* cgroup id */
	__type(value, struct ct_limit);
} unit_limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH); /* per-CPU: no atomics on the hot path */
	__uint(max_entries, CT_MAX_TRAFFIC);
	__type(key, __u32); /* tgid */
	__type(value, struct ct_traffic);
} proc_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_config);
} ct_config_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_global);
} global_stats SEC(".maps");

/* Refill and charge one bucket; returns 1 to pass, 0 to drop. */
static __always_inline int charge(struct ct_limit *l, int dir, __u64 len, __u64 now)
{
	struct ct_bucket *b = &l->dir[dir & 1];
	int pass = 1;

	bpf_spin_lock(&l->lock);
	b->calls++;
	if (b->rate) {
		__u64 elapsed = now - b->last_ns;

		if (now < b->last_ns) {
			elapsed = 0;
		} else if (elapsed >= NSEC_PER_SEC) {
			b->tokens = (__s64)b->burst;
			b->last_ns = now;
		} else {
			/* elapsed < 1 s: elapsed_us * rate < 2^20 * 2^40, no overflow */
			__u64 us = elapsed / NSEC_PER_USEC;

			if (us) {
				__s64 t = b->tokens + (__s64)(us * b->rate / USEC_PER_SEC);

				if (t > (__s64)b->burst)
					t = (__s64)b->burst;
				b->tokens = t;
				b->last_ns += us * NSEC_PER_USEC;
			}
		}
		if (b->tokens > 0)
			b->tokens -= (__s64)len;
		else
			pass = 0;
	}
	if (pass) {
		b->passed_bytes += len;
		b->passed_packets++;
	} else {
		b->dropped_bytes += len;
		b->dropped_packets++;
	}
	bpf_spin_unlock(&l->lock);
	return pass;
}

static __always_inline void account(__u32 tgid, int dir, __u64 len)
{
	struct ct_traffic *t = bpf_map_lookup_elem(&proc_traffic, &tgid);

	if (!t) {
		struct ct_traffic zero = {};

		bpf_map_update_elem(&proc_traffic, &tgid, &zero, BPF_NOEXIST);
		t = bpf_map_lookup_elem(&proc_traffic, &tgid);
		if (!t)
			return;
	}
	t->bytes[dir & 1] += len;
	t->packets[dir & 1]++;
}

static __always_inline int unit_charge(struct __sk_buff *skb, struct ct_config *cfg, int dir,
				       __u64 len)
{
	__u64 levels;
	int pass = 1;

	levels = cfg->unit_levels;
	if (!levels)
		return 1;
	for (int level = 0; level < CT_MAX_LEVELS; level++) {
		if (!(levels & (1ULL << level)))
			continue;
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
		if (!id)
			continue;
		struct ct_limit *ul = bpf_map_lookup_elem(&unit_limits, &id);
		if (ul && !charge(ul, dir, len, bpf_ktime_get_ns())) {
			pass = 0;
			break;
		}
	}
	return pass;
}

static __always_inline void bump_member_gen(void)
{
	__u32 zero = 0;
	struct ct_config *cfg = bpf_map_lookup_elem(&ct_config_map, &zero);

	if (cfg)
		__sync_fetch_and_add(&cfg->member_gen, 1);
}

static __always_inline int handle(struct __sk_buff *skb, int dir)
{
	__u32 zero = 0;
	struct ct_global *g = bpf_map_lookup_elem(&global_stats, &zero);
	struct ct_config *cfg = bpf_map_lookup_elem(&ct_config_map, &zero);
	struct bpf_sock *sk = skb->sk;
	__u64 len = skb->len;
	int pass = 1;

	if (!g || !cfg)
		return CT_PASS;
	g->calls[dir & 1]++;

	if (sk)
		sk = bpf_sk_fullsock(sk);
	if (sk) {
		struct ct_sk_tag *tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);

		if (tag) {
			__u32 tgid = tag->tgid;
			__u64 gen = cfg->member_gen;
			__u32 budget = tag->budget;

			if (tag->gen != gen) { /* membership changed since: look it up again */
				__u32 *b = bpf_map_lookup_elem(&proc_budget, &tgid);

				budget = b ? *b : 0;
				tag->budget = budget;
				tag->gen = gen;
			}
			if (budget) {
				struct ct_limit *l = bpf_map_lookup_elem(&limits, &budget);

				if (l)
					pass = charge(l, dir, len, bpf_ktime_get_ns());
			}
			if (pass)
				account(tgid, dir, len);
		} else {
			g->untagged[dir & 1]++;
		}
	}
	if (pass)
		pass = unit_charge(skb, cfg, dir, len);
	if (pass)
		return CT_PASS;
	g->dropped[dir & 1]++;
	return dir == CT_DIR_UPLOAD ? CT_DROP_CN : CT_DROP;
}

SEC("cgroup_skb/ingress")
int ct_ingress(struct __sk_buff *skb)
{
	return handle(skb, CT_DIR_DOWNLOAD);
}

SEC("cgroup_skb/egress")
int ct_egress(struct __sk_buff *skb)
{
	return handle(skb, CT_DIR_UPLOAD);
}

/* Tag every new inet socket with the process that creates it. */
SEC("cgroup/sock_create")
int ct_sock_create(struct bpf_sock *sk)
{
	struct ct_sk_tag *tag = bpf_sk_storage_get(&sk_tag, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (tag) {
		tag->tgid = bpf_get_current_pid_tgid() >> 32;
		tag->gen = (__u64)-1; /* no cached budget yet */
	}
	return 1;
}

/* A new process joins its parent's budget (threads share the tgid and need nothing). */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(ct_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	__u32 *budget;

	if (ptgid == ctgid)
		return 0;
	budget = bpf_map_lookup_elem(&proc_budget, &ptgid);
	if (budget) {
		__u32 b = *budget;

		bpf_map_update_elem(&proc_budget, &ctgid, &b, BPF_ANY);
		bump_member_gen();
	}
	return 0;
}

/* The last thread of a process leaves: forget its budget membership, so a later process
 * that reuses the pid is never throttled by accident. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(ct_exit, struct task_struct *p)
{
	__u32 tgid = p->tgid;

	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;
	if (bpf_map_delete_elem(&proc_budget, &tgid) == 0)
		bump_member_gen();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
