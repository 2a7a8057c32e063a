// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * chadthrottle: per-process and per-cgroup bandwidth limits.
 *
 * Mechanism only; every policy (who is limited, how fast, burst sizes, segment sizes) is
 * written into the maps by the daemon.
 *
 *   membership  task-local storage of a process holds its budget; a fork copies it to the
 *               child, the storage dies with the task (a reused pid starts clean), the last
 *               member's exit is reported; enrollment of running process trees is done here
 *               too (iter/task), so only live processes are ever members.
 *   attribution socket-local storage carries the budget of its owner: set at creation
 *               (cgroup/sock_create), for existing sockets by iter/task_file, and moved to a
 *               limited process that uses a socket it did not create (send/recv tracepoints:
 *               SCM_RIGHTS, pidfd_getfd).
 *   shaping     TCP sockets are paced (SO_MAX_PACING_RATE, set from sock_ops and iter/tcp)
 *               to their share of the budget: the budget's rate divided among its sockets
 *               active in the last 100 ms; a local sender of a limited connection is paced
 *               the same way; new connections of low limits get a small MSS; receive windows
 *               are bounded for remote senders, whose packets a tc classifier puts into the
 *               budget's queue (ifb + htb, devices owned by the daemon).
 *   backstop    a token bucket per budget and direction (cgroup_skb) keeps the budget exact
 *               for UDP and anything pacing misses: it admits while tokens last, charges
 *               payload bytes, and drops as a last resort.
 *   rules       at exec, rule slots are tried in precedence order against the file's inode,
 *               the uid, the name and the cgroup; a match enrolls the process before it runs
 *               a single instruction of the new program.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "throttle.h"
#include "bucket.h"

/* cgroup_skb verdicts */
#define CT_DROP 0
#define CT_PASS 1
#define CT_DROP_CN 2 /* egress only: drop and tell TCP to reduce its window */

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SOL_SOCKET 1
#define SO_MAX_PACING_RATE 47
#define SOL_TCP 6
#define TCP_MAXSEG 2
#define TCP_WINDOW_CLAMP 10
#define TCP_CONGESTION 13
#define TCP_CLOSE 7
#define PF_EXITING 0x00000004
#define PF_KTHREAD 0x00200000
#define TC_H_MAJ_1 0x10000 /* htb root handle 1: */
#define CT_TC_NEXT (-1)    /* TC_ACT_UNSPEC (direct action): not ours, the next filter decides */

#define CT_UNLIMITED_PACE 0xffffffffU
#define CT_CWND_RELEASE 0x7fffffff
#define CT_CLAMP_RELEASE (64 << 20) /* window clamp that no longer limits anything */
#define CT_CLASS_UNIT (1ULL << 63) /* dl_class key bit: a unit (cgroup id), not a budget */
#define CT_ANCESTRY_MAX 64         /* process tree depth the enroll iterator walks */
#define CT_MIN_CLAMP 8192          /* never clamp a receive window below this */

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct ct_sk_tag);
} sk_tag SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ct_task);
} task_budget SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_LIMITS);
	__type(key, __u64); /* budget id */
	__type(value, struct ct_limit);
} limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_LIMITS);
	__type(key, __u64);
	__type(value, struct ct_limit_cfg);
} limit_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_UNITS);
	__type(key, __u64); /* cgroup id */
	__type(value, struct ct_limit);
} unit_limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_UNITS);
	__type(key, __u64);
	__type(value, struct ct_limit_cfg);
} unit_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH); /* per-CPU: no atomics on the hot path */
	__uint(max_entries, CT_MAX_TRAFFIC);
	__type(key, __u32); /* tgid */
	__type(value, struct ct_traffic);
} proc_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_PEERS);
	__type(key, struct ct_peer_key);
	__type(value, __u64); /* budget of the limited socket at the other end */
} peer_pace SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_CLASSES);
	__type(key, __u64);   /* budget id, or cgroup id | CT_CLASS_UNIT */
	__type(value, __u32); /* htb class minor on the daemon's ifb devices */
} dl_class SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CT_MAX_RULES);
	__type(key, __u32);
	__type(value, struct ct_rule);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_EXE);
	__type(key, struct ct_exe_key);
	__type(value, __u8);
} exe_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_WATCH);
	__type(key, struct ct_dir_key);
	__type(value, __u8);
} exe_dirs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_WATCH);
	__type(key, __u64);  /* cgroup id */
	__type(value, __u8); /* 1: report its rmdir; 2: report mkdirs below it */
} watch_cgroups SEC(".maps");

/* Devices limited downloads arrive on (ifindex -> state; the daemon queues there). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_DEVICES);
	__type(key, __u32);
	__type(value, struct ct_device);
} dl_devices SEC(".maps");

/* Budgets that saw traffic since the last sample (the daemon takes and empties it), so a
 * sample costs what is active, not what is limited. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_ACTIVE);
	__type(key, __u64);
	__type(value, __u8);
} active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CT_MAX_CHECKS);
	__type(key, __u64); /* budget id */
	__type(value, struct ct_check);
} checks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CT_MAX_FILE_SOCKS);
	__type(key, __u64); /* the socket's inode number */
	__type(value, struct ct_file_sock);
} file_socks SEC(".maps");

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

/* Budgets the kernel allocates (scope=process rules): CT_KERNEL_BID + n, n counted here. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} kernel_bids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CT_EVENTS_BYTES);
} events SEC(".maps");

/* ---- small helpers ------------------------------------------------------------------ */

/* kernfs_node's parent pointer was renamed (parent -> __parent); CO-RE picks the one the
 * running kernel has. */
struct kernfs_node___new {
	struct kernfs_node *__parent;
} __attribute__((preserve_access_index));
struct kernfs_node___old {
	struct kernfs_node *parent;
} __attribute__((preserve_access_index));

static __always_inline struct kernfs_node *kn_parent(struct kernfs_node *kn)
{
	struct kernfs_node___new *n = (void *)kn;

	if (bpf_core_field_exists(n->__parent))
		return BPF_CORE_READ(n, __parent);
	return BPF_CORE_READ((struct kernfs_node___old *)kn, parent);
}

static __always_inline struct ct_config *ct_cfg(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ct_config_map, &zero);
}

static __always_inline struct ct_global *ct_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&global_stats, &zero);
}

static __always_inline void emit(__u32 type, __u32 tgid, __u64 budget, __u64 a, __u64 b,
				 __u32 rule)
{
	struct ct_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		struct ct_global *g = ct_stats();

		if (g)
			g->events_lost++;
		return;
	}
	e->type = type;
	e->tgid = tgid;
	e->budget = budget;
	e->a = a;
	e->b = b;
	e->rule = rule;
	e->_pad0 = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
}

/* A map was full: the process `tgid` (0 if unknown) could not be limited as it should (for
 * rule slot `rule`, 0 if none); the daemon says so in the journal and retries later. */
static __always_inline void count_full(__u32 which, __u32 tgid, __u32 rule)
{
	struct ct_global *g = ct_stats();

	if (g)
		g->full++;
	emit(CT_EV_FULL, tgid, 0, which, 0, rule);
}

/* A process's pid as the daemon sees it (its pid namespace may be a container's); 0 for a
 * process outside the daemon's namespace.  Every pid stored or reported is this one. */
static __always_inline __u32 ns_tgid(struct task_struct *t, struct ct_config *cfg)
{
	struct pid *p;
	struct upid u;
	__u32 level = cfg->pid_level;

	if (!level) /* read, not loaded: both returns then come from the stack (the verifier
		     * refuses one load instruction used with two kinds of pointer) */
		return BPF_CORE_READ(t, tgid);
	p = BPF_CORE_READ(t, group_leader, thread_pid);
	if (!p || BPF_CORE_READ(p, level) < level)
		return 0;
	if (bpf_probe_read_kernel(&u, sizeof(u), (void *)((unsigned long)p +
				  bpf_core_field_offset(struct pid, numbers) +
				  (level & 0x1f) * sizeof(struct upid))))
		return 0;
	return u.nr;
}

static __always_inline __u32 current_tgid(struct ct_config *cfg)
{
	return cfg->pid_level ? ns_tgid(bpf_get_current_task_btf(), cfg)
			      : bpf_get_current_pid_tgid() >> 32;
}

static __always_inline __u64 task_bid(struct ct_task *st)
{
	return st ? st->state & CT_BID_MASK : 0;
}

/* ---- settings ------------------------------------------------------------------------ */

/* The settings generation a packet works with: read once, so the lookup before the lock
 * and the check under it see the same one (read twice, a change the daemon made in between
 * marked the limit up to date with no settings looked up, and its new rate never came in). */
static __always_inline __u64 cfg_gen_of(struct ct_config *cfg)
{
	return *(volatile __u64 *)&cfg->cfg_gen;
}

/* A limit's settings, copied in from its cfg map when the daemon changed something since the
 * last packet.  The map lookup happens before the lock is taken (no helper under a lock). */
static __always_inline struct ct_limit_cfg *pending_cfg(void *cfg_map, __u64 key,
							struct ct_limit *l, __u64 gen)
{
	if (l->cfg_gen == gen)
		return 0;
	return bpf_map_lookup_elem(cfg_map, &key);
}

static __always_inline void apply_cfg(struct ct_limit *l, struct ct_limit_cfg *c, __u64 gen,
				      __u64 now)
{
	/* under the lock; c was looked up for gen (none: another packet is ahead, or the limit
	 * is going away; the next packet looks again) */
	if (!c)
		return;
	l->cfg_gen = gen;
	if (l->set_gen == c->gen)
		return;
	l->set_gen = c->gen;
	l->mss = c->mss;
	bucket_settings(&l->dir[0], c->rate[0], c->burst[0], c->slack[0], now);
	bucket_settings(&l->dir[1], c->rate[1], c->burst[1], c->slack[1], now);
}

/* ---- the packet path (cgroup_skb) ------------------------------------------------------ */

/* Payload bytes of a packet (what users measure): skb->len minus the IP and TCP/UDP
 * headers.  A GSO packet carries one set of headers for all its segments. */
static __always_inline __u64 payload_len(struct __sk_buff *skb)
{
	__u32 hl = 0, proto = 0;
	__u8 b[2];

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes_relative(skb, 0, b, 1, BPF_HDR_START_NET))
			return skb->len;
		hl = (b[0] & 0xf) * 4;
		if (bpf_skb_load_bytes_relative(skb, 9, b, 1, BPF_HDR_START_NET))
			return skb->len;
		proto = b[0];
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		hl = 40;
		if (bpf_skb_load_bytes_relative(skb, 6, b, 1, BPF_HDR_START_NET))
			return skb->len;
		proto = b[0];
	} else {
		return skb->len;
	}
	if (proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes_relative(skb, (hl & 0x3ff) + 12, b, 1, BPF_HDR_START_NET))
			return skb->len;
		hl += (b[0] >> 4) * 4;
	} else if (proto == IPPROTO_UDP) {
		hl += 8;
	}
	return skb->len > hl ? skb->len - hl : 0;
}

static __always_inline int charge_limit(struct ct_limit *l, struct ct_limit_cfg *c,
					__u64 gen, int dir, __u64 len, __u64 now,
					int fresh, int grace)
{
	int pass;

	bpf_spin_lock(&l->lock);
	if (l->cfg_gen != gen)
		apply_cfg(l, c, gen, now);
	pass = bucket_charge(&l->dir[dir & 1], len, now, fresh, grace);
	bpf_spin_unlock(&l->lock);
	return pass;
}

static __always_inline void flush_traffic(struct ct_sk_tag *tag)
{
	__u32 tgid = tag->tgid;
	struct ct_traffic *t = bpf_map_lookup_elem(&proc_traffic, &tgid);

	if (!t) {
		struct ct_traffic zero = {};

		bpf_map_update_elem(&proc_traffic, &tgid, &zero, BPF_NOEXIST);
		t = bpf_map_lookup_elem(&proc_traffic, &tgid);
		if (!t)
			return;
	}
	for (int d = 0; d < CT_DIRS; d++) {
		t->bytes[d] += tag->pend_bytes[d];
		t->packets[d] += tag->pend_pkts[d];
		tag->pend_bytes[d] = 0;
		tag->pend_pkts[d] = 0;
	}
}

/* Count a packet for the socket's owner: in the tag, moved to proc_traffic in batches. */
static __always_inline void account(struct ct_sk_tag *tag, int dir, __u64 len)
{
	tag->pend_bytes[dir & 1] += len;
	if (++tag->pend_pkts[dir & 1] >= CT_FLUSH_PACKETS && tag->tgid)
		flush_traffic(tag);
}

/* A limited download came in on a device other than loopback: the first time, the daemon
 * is told, so it can give that device a download queue (only devices that carry limited
 * downloads ever get one). */
static __always_inline void note_device(struct __sk_buff *skb, __u64 now)
{
	__u32 ifindex = skb->ingress_ifindex;
	struct ct_device fresh = { .seen_ns = now, .state = CT_DEV_PENDING };

	if (ifindex <= 1 || bpf_map_lookup_elem(&dl_devices, &ifindex))
		return;
	if (!bpf_map_update_elem(&dl_devices, &ifindex, &fresh, BPF_NOEXIST))
		emit(CT_EV_DEVICE, 0, 0, ifindex, 0, 0);
}

/* Until a device's queue is there (some milliseconds of ip, tc and netlink after its first
 * limited download) the bucket would police the sender's first flight and cost it
 * retransmissions: for at most CT_QUEUE_GRACE_NS after that first packet an over-limit
 * download passes without adding to the bucket's debt (counted in queue_grace; the receive
 * window clamp bounds what the sender has in flight meanwhile).  The daemon ends the grace
 * when the device is queued or refused; without download queues there is none.  Budgets
 * only: unit limits police that first flight (a grace in their per-level loop costs the
 * verifier more states than it allows). */
static __always_inline void count_grace(void)
{
	struct ct_global *g = ct_stats();

	if (g)
		g->queue_grace++;
}

static __always_inline int queue_grace(struct __sk_buff *skb, struct ct_config *cfg, __u64 now)
{
	__u32 ifindex = skb->ingress_ifindex;
	struct ct_device *d;

	if (!(cfg->flags & CT_CFG_QUEUES) || ifindex <= 1)
		return 0;
	d = bpf_map_lookup_elem(&dl_devices, &ifindex);
	return d && d->state == CT_DEV_PENDING && now - d->seen_ns < CT_QUEUE_GRACE_NS;
}

/* Unit limits at every level where one exists; remembers the innermost limited unit in the
 * socket's tag (pacing and queueing use it). */
static __always_inline int unit_charge(struct __sk_buff *skb, struct ct_config *cfg,
				       struct ct_sk_tag *tag, int dir, __u64 len, __u64 now,
				       int fresh)
{
	__u64 levels = cfg->unit_levels;
	__u64 innermost = 0;
	int pass = 1;

	for (int level = 0; level < CT_MAX_LEVELS; level++) {
		if (!(levels & (1ULL << level)))
			continue;
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);
		if (!id)
			continue;
		struct ct_limit *ul = bpf_map_lookup_elem(&unit_limits, &id);
		if (!ul)
			continue;
		innermost = id;
		if (dir == CT_DIR_DOWNLOAD && ul->dir[CT_DIR_DOWNLOAD].rate)
			note_device(skb, now);
		__u64 gen = cfg_gen_of(cfg);
		struct ct_limit_cfg *c = pending_cfg(&unit_cfg, id, ul, gen);
		if (!charge_limit(ul, c, gen, dir, len, now, fresh, 0)) { /* no grace here */
			pass = 0;
			break;
		}
	}
	if (tag && innermost && tag->unit != innermost)
		tag->unit = innermost;
	return pass;
}

static __always_inline int handle(struct __sk_buff *skb, int dir)
{
	struct ct_config *cfg = ct_cfg();
	struct bpf_sock *sk = skb->sk;
	struct ct_sk_tag *tag = 0;
	struct ct_global *g;
	__u64 now = 0, len = skb->len;
	int pass = 1, fresh = 0, grace = 0;

	if (!cfg)
		return CT_PASS;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	if (sk)
		tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);
	if (!tag) {
		g = ct_stats();
		if (g)
			g->untagged[dir & 1]++;
		if (!cfg->unit_levels)
			return CT_PASS;
	}
	if (tag && (tag->budget || cfg->unit_levels)) {
		now = bpf_ktime_get_ns();
		len = payload_len(skb);
		if (len) {
			__u64 ep = now / CT_EPOCH_NS;

			fresh = tag->seen[dir & 1] != ep;
			if (fresh)
				tag->seen[dir & 1] = ep;
		}
	}
	if (tag && tag->budget) {
		__u64 bid = tag->budget;
		struct ct_limit *l = bpf_map_lookup_elem(&limits, &bid);

		if (l) {
			__u64 gen = cfg_gen_of(cfg);
			struct ct_limit_cfg *c = pending_cfg(&limit_cfg, bid, l, gen);

			if (l->seen_gen != cfg->sample_gen) {
				__u8 one = 1;

				l->seen_gen = cfg->sample_gen;
				bpf_map_update_elem(&active, &bid, &one, BPF_ANY);
			}
			if (dir == CT_DIR_DOWNLOAD && l->dir[CT_DIR_DOWNLOAD].rate)
				note_device(skb, now);
			if (dir == CT_DIR_DOWNLOAD && l->dir[CT_DIR_DOWNLOAD].rate)
				grace = queue_grace(skb, cfg, now);
			pass = charge_limit(l, c, gen, dir, len, now, fresh, grace);
			if (pass == 2)
				count_grace();
		} else {
			tag->budget = 0; /* the limit is gone */
		}
	}
	if (tag && pass)
		account(tag, dir, len);
	if (pass && cfg->unit_levels) {
		if (!now) {
			now = bpf_ktime_get_ns();
			len = payload_len(skb);
		}
		pass = unit_charge(skb, cfg, tag, dir, len, now, fresh);
	}
	if (pass)
		return CT_PASS;
	g = ct_stats();
	if (g)
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

/* ---- attribution ------------------------------------------------------------------------ */

/* Tag every new inet socket with the process that creates it and that process's budget. */
SEC("cgroup/sock_create")
int ct_sock_create(struct bpf_sock *sk)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct ct_config *cfg = ct_cfg();
	struct ct_sk_tag *tag;
	struct ct_task *st;

	if (!cfg)
		return 1;
	tag = bpf_sk_storage_get(&sk_tag, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!tag)
		return 1;
	tag->tgid = current_tgid(cfg);
	st = bpf_task_storage_get(&task_budget, task->group_leader, 0, 0);
	tag->budget = task_bid(st);
	return 1;
}

/* A socket closes: what its tag still holds goes to its owner's counters. */
SEC("cgroup/sock_release")
int ct_sock_release(struct bpf_sock *sk)
{
	struct ct_sk_tag *tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);

	if (tag && tag->tgid && (tag->pend_pkts[0] || tag->pend_pkts[1]))
		flush_traffic(tag);
	return 1;
}

/* A limited process that sends or receives on a socket another process created (passed with
 * SCM_RIGHTS, taken with pidfd_getfd), or on one of its own no tagging pass reached (it is
 * in another network namespace than the daemon, or it came before the daemon), is charged
 * for it from then on.  A socket is never moved out of a budget this way: an unlimited
 * process using a limited process's socket leaves it charged where it was. */
static __always_inline void sock_used(struct sock *sk)
{
	struct ct_config *cfg = ct_cfg();
	struct task_struct *task;
	struct ct_sk_tag *tag;
	struct ct_task *st;
	__u16 family;
	__u32 tgid;
	__u64 bid;

	if (!cfg || !(cfg->flags & CT_CFG_BUDGETS))
		return;
	tgid = current_tgid(cfg);
	if (tgid == cfg->daemon_tgid)
		return;
	task = bpf_get_current_task_btf();
	st = bpf_task_storage_get(&task_budget, task->group_leader, 0, 0);
	bid = task_bid(st);
	if (!bid)
		return;
	family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return;
	tag = bpf_sk_storage_get(&sk_tag, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!tag || tag->budget == bid)
		return;
	tag->budget = bid;
	tag->tgid = tgid;
	{
		struct ct_global *g = ct_stats();

		if (g)
			g->retagged++;
	}
	emit(CT_EV_RETAG, tgid, bid, 0, 0, 0);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ct_sock_send, struct sock *sk, int ret, int flags)
{
	if (ret > 0)
		sock_used(sk);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(ct_sock_recv, struct sock *sk, int ret, int flags)
{
	if (ret > 0)
		sock_used(sk);
	return 0;
}

/* ---- membership ------------------------------------------------------------------------ */

/* Put a live process (a thread-group leader) in budget bid.  Only this function, the fork
 * handler and the exit handler change ct_task.state, always with an atomic exchange, so a
 * process is counted in exactly one budget, exactly once; a process that started exiting
 * meanwhile is taken out again (the exit handler may already have run). */
static __always_inline int enroll(struct task_struct *t, __u64 bid, __u32 flags, __u32 rule)
{
	struct ct_limit *l = bpf_map_lookup_elem(&limits, &bid);
	struct ct_task *st;
	__u64 old;

	if (!l)
		return 0;
	if (t->exit_state || (t->flags & PF_EXITING))
		return 0;
	st = bpf_task_storage_get(&task_budget, t, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!st) {
		struct ct_config *cfg = ct_cfg();

		count_full(CT_FULL_TASKS, cfg ? ns_tgid(t, cfg) : 0, rule);
		return 0;
	}
	if ((st->state & CT_BID_MASK) == bid && (st->state & CT_COUNTED)) {
		st->flags |= flags;
		return 1;
	}
	st->flags = flags;
	st->rule = rule;
	__sync_fetch_and_add(&l->members, 1);
	old = __sync_lock_test_and_set(&st->state, bid | CT_COUNTED);
	if (old & CT_COUNTED) {
		__u64 ob = old & CT_BID_MASK;
		struct ct_limit *ol = bpf_map_lookup_elem(&limits, &ob);

		if (ol && __sync_fetch_and_add(&ol->members, -1) == 1) {
			struct ct_config *cfg = ct_cfg();

			emit(CT_EV_EMPTY, cfg ? ns_tgid(t, cfg) : 0, ob, 0, 0, ol->rule);
		}
	}
	if (t->flags & PF_EXITING) { /* lost a race with exit: undo unless exit did */
		old = __sync_lock_test_and_set(&st->state, 0);
		if (old & CT_COUNTED)
			__sync_fetch_and_add(&l->members, -1);
		return 0;
	}
	return 1;
}

/* A new process joins its parent's budget (threads share the leader's storage). */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(ct_fork, struct task_struct *parent, struct task_struct *child)
{
	struct ct_task *pst, *cst;
	struct ct_limit *l;
	__u64 v, bid;

	if (parent->tgid == child->tgid)
		return 0;
	pst = bpf_task_storage_get(&task_budget, parent->group_leader, 0, 0);
	if (!pst)
		return 0;
	v = pst->state;
	if (!(v & CT_COUNTED))
		return 0;
	bid = v & CT_BID_MASK;
	l = bpf_map_lookup_elem(&limits, &bid);
	if (!l)
		return 0;
	cst = bpf_task_storage_get(&task_budget, child, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!cst) {
		struct ct_config *cfg = ct_cfg();

		count_full(CT_FULL_TASKS, cfg ? ns_tgid(child, cfg) : 0, 0);
		return 0;
	}
	cst->flags = pst->flags & CT_TASK_EXPLICIT;
	cst->rule = pst->rule;
	__sync_fetch_and_add(&l->members, 1);
	__sync_lock_test_and_set(&cst->state, bid | CT_COUNTED);
	return 0;
}

/* The last thread of a process leaves: it leaves its budget; the budget's last member
 * leaving is reported, as is a root leaving while other members live. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(ct_exit, struct task_struct *p)
{
	struct ct_config *cfg;
	struct ct_task *st;
	struct ct_limit *l;
	__u64 v, bid;
	__s64 before;
	__u32 tgid;

	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;
	st = bpf_task_storage_get(&task_budget, p->group_leader, 0, 0);
	if (!st)
		return 0;
	v = __sync_lock_test_and_set(&st->state, 0);
	if (!(v & CT_COUNTED))
		return 0;
	bid = v & CT_BID_MASK;
	l = bpf_map_lookup_elem(&limits, &bid);
	if (!l)
		return 0;
	before = __sync_fetch_and_add(&l->members, -1);
	cfg = ct_cfg();
	tgid = cfg ? ns_tgid(p, cfg) : 0;
	if (before <= 1)
		emit(CT_EV_EMPTY, tgid, bid, 0, 0, l->rule);
	else if (st->flags & CT_TASK_ROOT)
		emit(CT_EV_ROOT_EXIT, tgid, bid, 0, 0, l->rule);
	return 0;
}

/* A member moved to another cgroup (systemd-run, a container runtime): the daemon makes sure
 * programs cover the new place. */
SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(ct_cgroup_attach, struct cgroup *dst, const char *path, struct task_struct *task,
	     bool threadgroup)
{
	struct ct_config *cfg = ct_cfg();
	struct ct_task *st;

	if (!cfg || dst->root->hierarchy_id != 0) /* cgroup v1 hierarchies do not matter */
		return 0;
	st = bpf_task_storage_get(&task_budget, task->group_leader, 0, 0);
	if (!st || !(st->state & CT_COUNTED))
		return 0;
	emit(CT_EV_CGROUP_MOVE, ns_tgid(task, cfg), st->state & CT_BID_MASK, dst->kn->id, 0, 0);
	return 0;
}

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(ct_cgroup_rmdir, struct cgroup *cgrp, const char *path)
{
	__u64 id;
	__u8 *w;

	if (cgrp->root->hierarchy_id != 0)
		return 0;
	id = cgrp->kn->id;
	w = bpf_map_lookup_elem(&watch_cgroups, &id);
	if (w && (*w & 1))
		emit(CT_EV_CGROUP_RMDIR, 0, 0, id, 0, 0);
	return 0;
}

SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(ct_cgroup_mkdir, struct cgroup *cgrp, const char *path)
{
	struct kernfs_node *parent;
	__u64 pid;
	__u8 *w;

	if (cgrp->root->hierarchy_id != 0 || cgrp->level < 1)
		return 0;
	parent = kn_parent(cgrp->kn);
	if (!parent)
		return 0;
	pid = BPF_CORE_READ(parent, id);
	w = bpf_map_lookup_elem(&watch_cgroups, &pid);
	if (w && (*w & 2))
		emit(CT_EV_CGROUP_MKDIR, 0, 0, cgrp->kn->id, pid, 0);
	return 0;
}

/* ---- rules: decided at exec --------------------------------------------------------- */

struct exec_ctx {
	struct task_struct *task;
	struct ct_config *cfg;
	__u64 ino;
	__u32 dev;
	__u32 uid;
	__u64 dir_ino;
	__u32 dir_dev;
	__u32 matched;   /* slot + 1 */
	__u32 user_slot; /* first slot needing user space + 1 */
	char comm[16];
};

static __always_inline int comm_equal(const char *a, const char *b)
{
	for (int i = 0; i < 16; i++) {
		if (a[i] != b[i])
			return 0;
		if (!a[i])
			return 1;
	}
	return 1;
}

static int try_rule(__u32 slot, struct exec_ctx *x)
{
	struct ct_rule *r;

	if (slot >= x->cfg->nrules)
		return 1; /* stop */
	r = bpf_map_lookup_elem(&rules, &slot);
	if (!r || !(r->flags & CT_RULE_ACTIVE))
		return 0;
	if ((r->flags & CT_RULE_UID) && r->uid != x->uid)
		return 0;
	if ((r->flags & CT_RULE_COMM) && !comm_equal(r->comm, x->comm))
		return 0;
	if (r->flags & CT_RULE_UNIT) {
		if (bpf_get_current_ancestor_cgroup_id(r->unit_level) != r->unit)
			return 0;
	}
	if (r->flags & CT_RULE_EXE) {
		struct ct_exe_key k = { .ino = x->ino, .dev = x->dev, .slot = slot };

		if (!bpf_map_lookup_elem(&exe_rules, &k)) {
			struct ct_dir_key d = { .ino = x->dir_ino, .dev = x->dir_dev };

			/* an unknown file in a watched directory (a replaced binary, a new file
			 * under a glob): user space decides by path */
			if (!x->user_slot && (x->cfg->flags & CT_CFG_EXEC_DIRS) &&
			    bpf_map_lookup_elem(&exe_dirs, &d))
				x->user_slot = slot + 1;
			return 0;
		}
	}
	if (r->flags & CT_RULE_USER) {
		if (!x->user_slot)
			x->user_slot = slot + 1;
		return 0;
	}
	x->matched = slot + 1;
	return 1;
}

static __always_inline __u64 new_rule_budget(struct ct_rule *r, __u32 slot, __u32 tgid,
					     struct ct_config *cfg)
{
	struct ct_limit_cfg c = {};
	struct ct_limit l = {};
	__u64 bid, now = bpf_ktime_get_ns(), *n;
	__u32 zero = 0;

	n = bpf_map_lookup_elem(&kernel_bids, &zero);
	if (!n)
		return 0;
	bid = CT_KERNEL_BID + __sync_fetch_and_add(n, 1);
	c.rate[0] = r->rate[0];
	c.rate[1] = r->rate[1];
	c.burst[0] = r->burst[0];
	c.burst[1] = r->burst[1];
	c.slack[0] = r->slack[0];
	c.slack[1] = r->slack[1];
	c.mss = r->mss;
	c.gen = 1;
	if (bpf_map_update_elem(&limit_cfg, &bid, &c, BPF_NOEXIST)) {
		count_full(CT_FULL_LIMITS, tgid, slot + 1);
		return 0;
	}
	for (int d = 0; d < CT_DIRS; d++) {
		l.dir[d].rate = r->rate[d];
		l.dir[d].burst = r->burst[d];
		l.dir[d].slack = r->slack[d];
		l.dir[d].tokens = r->rate[d] ? CT_INITIAL_TOKENS : 0;
		l.dir[d].last_ns = now;
	}
	l.cfg_gen = cfg->cfg_gen;
	l.set_gen = 1;
	l.root_tgid = tgid;
	l.mss = r->mss;
	l.rule = slot + 1;
	if (bpf_map_update_elem(&limits, &bid, &l, BPF_NOEXIST)) {
		bpf_map_delete_elem(&limit_cfg, &bid);
		count_full(CT_FULL_LIMITS, tgid, slot + 1);
		return 0;
	}
	return bid;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(ct_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct exec_ctx x = {};
	struct ct_task *st;
	struct ct_rule *r;
	struct inode *ino;
	__u32 slot, flags, tgid;
	__u64 bid;

	x.cfg = ct_cfg();
	if (!x.cfg || !x.cfg->nrules)
		return 0;
	tgid = ns_tgid(p, x.cfg);
	if (tgid <= 1 || tgid == x.cfg->daemon_tgid)
		return 0; /* never pid 1 (systemd re-executes itself), never the daemon, never a
			   * process outside the daemon's pid namespace */
	x.task = p;
	st = bpf_task_storage_get(&task_budget, p->group_leader, 0, 0);
	if (st && (st->flags & CT_TASK_EXPLICIT) && (st->state & CT_COUNTED)) {
		__u64 cur = st->state & CT_BID_MASK;

		if (bpf_map_lookup_elem(&limits, &cur))
			return 0; /* an explicit SetLimit wins over every rule */
	}
	ino = bprm->file->f_inode;
	x.ino = ino->i_ino;
	x.dev = ino->i_sb->s_dev;
	ino = bprm->file->f_path.dentry->d_parent->d_inode;
	x.dir_ino = ino->i_ino;
	x.dir_dev = ino->i_sb->s_dev;
	x.uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(x.comm, sizeof(x.comm));
	bpf_loop(CT_MAX_RULES, try_rule, &x, 0);
	if (x.user_slot && (!x.matched || x.user_slot < x.matched))
		emit(CT_EV_EXEC, tgid, 0, x.ino, x.dev, x.user_slot);
	if (!x.matched)
		return 0;
	slot = x.matched - 1;
	r = bpf_map_lookup_elem(&rules, &slot);
	if (!r)
		return 0;
	if (st && (st->state & CT_COUNTED) && st->rule == x.matched)
		return 0; /* already in this rule's budget (a fork of a matched process) */
	if (r->flags & CT_RULE_APP) {
		bid = r->app_budget;
	} else {
		bid = new_rule_budget(r, slot, tgid, x.cfg);
		if (!bid)
			return 0;
	}
	flags = CT_TASK_ROOT;
	if (enroll(p->group_leader, bid, flags, x.matched))
		emit(CT_EV_RULE, tgid, bid, 0, 0, x.matched);
	else if (!(r->flags & CT_RULE_APP))
		emit(CT_EV_EMPTY, tgid, bid, 0, 0, x.matched);
	return 0;
}

/* ---- iterators: the daemon's hands in the kernel ---------------------------------------- */

/* Is t (a live leader) a descendant of a process in budget bid? */
static __always_inline int descends_from(struct task_struct *t, __u64 bid)
{
	struct task_struct *p = t;

	for (int i = 0; i < CT_ANCESTRY_MAX; i++) {
		struct ct_task *st;

		p = p->real_parent;
		if (!p || p->pid <= 1)
			return 0;
		st = bpf_task_storage_get(&task_budget, p->group_leader, 0, 0);
		if (st && (st->state & CT_BID_MASK) == bid && (st->state & CT_COUNTED))
			return 1;
	}
	return 0;
}

SEC("iter/task")
int ct_iter_task(struct bpf_iter__task *ctx)
{
	struct task_struct *t = ctx->task;
	struct ct_config *cfg = ct_cfg();
	struct ct_member_rec rec;
	struct ct_self_rec self;
	struct ct_task *st;
	__u64 bid, v;
	__u32 tgid;

	if (!t || !cfg || t->pid != t->tgid || (t->flags & PF_KTHREAD))
		return 0;
	bid = cfg->iter_budget;
	tgid = ns_tgid(t, cfg);
	switch (cfg->iter_op) {
	case CT_ITER_SELF:
		self.pid_level = BPF_CORE_READ(t, thread_pid, level);
		self.cgroup_level = BPF_CORE_READ(t, nsproxy, cgroup_ns, root_cset, dfl_cgrp, level);
		bpf_seq_write(ctx->meta->seq, &self, sizeof(self));
		break;
	case CT_ITER_ENROLL:
		/* the root comes through a pid_fd filter (exact identity, no pid numbers);
		 * descendants are found by ancestry */
		if (tgid == cfg->iter_tgid)
			enroll(t, bid, (cfg->iter_arg & 0xff) | CT_TASK_ROOT, cfg->iter_arg >> 8);
		else if (descends_from(t, bid))
			enroll(t, bid, cfg->iter_arg & 0xff & ~CT_TASK_ROOT, cfg->iter_arg >> 8);
		break;
	case CT_ITER_RELEASE:
		st = bpf_task_storage_get(&task_budget, t, 0, 0);
		if (!st || (st->state & CT_BID_MASK) != bid)
			break;
		v = __sync_lock_test_and_set(&st->state, 0);
		st->flags = 0;
		st->rule = 0;
		if (v & CT_COUNTED) {
			struct ct_limit *l = bpf_map_lookup_elem(&limits, &bid);

			if (l)
				__sync_fetch_and_add(&l->members, -1);
			rec.tgid = tgid;
			rec.flags = 0;
			rec.budget = bid;
			bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
		}
		break;
	case CT_ITER_CENSUS:
		st = bpf_task_storage_get(&task_budget, t, 0, 0);
		if (!st || !(st->state & CT_COUNTED))
			break;
		if (bid && (st->state & CT_BID_MASK) != bid)
			break;
		rec.tgid = tgid;
		rec.flags = st->flags | (st->rule << 8);
		rec.budget = st->state & CT_BID_MASK;
		bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
		break;
	}
	return 0;
}

static __always_inline struct sock *file_inet_sock(struct file *f)
{
	struct socket *s;
	struct sock *sk;
	__u16 family;

	if (!f)
		return 0;
	s = bpf_sock_from_file(f);
	if (!s)
		return 0;
	sk = s->sk;
	if (!sk)
		return 0;
	family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	return sk;
}

/* Is the socket's cgroup at or below the cgroup `unit` (at `level`)? */
static __always_inline int sock_in_cgroup(struct sock *sk, __u64 unit, __u32 level)
{
	struct cgroup *cg = sk->sk_cgrp_data.cgroup;
	struct kernfs_node *kn;
	int up;

	if (!cg || cg->level < (int)level)
		return 0;
	kn = cg->kn;
	up = cg->level - (int)level;
	for (int i = 0; i < CT_MAX_LEVELS && i < up && kn; i++)
		kn = kn_parent(kn);
	return kn && BPF_CORE_READ(kn, id) == unit;
}

extern struct task_struct *bpf_task_from_pid(s32 pid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;

/* The membership of the process a visited task belongs to.  iter/task_file hands a plain
 * task pointer, and walking it (t->group_leader) gives an untrusted one on newer kernels
 * (6.18.44 here), which task storage refuses: the visited task is its process's leader
 * nearly always (threads share the leader's files and are skipped); otherwise the leader is
 * looked up by its pid, a trusted reference held for the lookup only. */
static __always_inline struct ct_task *process_membership(struct task_struct *t)
{
	struct task_struct *leader;
	struct ct_task *st;

	if (t->pid == t->tgid)
		return bpf_task_storage_get(&task_budget, t, 0, 0);
	leader = bpf_task_from_pid(t->tgid);
	if (!leader)
		return 0;
	st = bpf_task_storage_get(&task_budget, leader, 0, 0);
	bpf_task_release(leader);
	return st;
}

SEC("iter/task_file")
int ct_iter_files(struct bpf_iter__task_file *ctx)
{
	struct task_struct *t = ctx->task;
	struct ct_config *cfg = ct_cfg();
	struct ct_file_sock fs = {};
	struct file *f = ctx->file;
	struct ct_task *st;
	struct sock *sk;
	__u64 ino;

	if (!t || !cfg || !f)
		return 0;
	sk = file_inet_sock(f);
	if (!sk)
		return 0;
	switch (cfg->iter_op) {
	case CT_ITER_TAG:
		st = process_membership(t);
		fs.id = (st && (st->state & CT_COUNTED)) ? st->state & CT_BID_MASK : 0;
		fs.leaving = cfg->iter_budget;
		break;
	case CT_ITER_CHECK: {
		struct ct_check *c;
		__u64 bid;

		st = process_membership(t);
		if (!st || !(st->state & CT_COUNTED))
			return 0;
		bid = st->state & CT_BID_MASK;
		c = bpf_map_lookup_elem(&checks, &bid);
		if (!c)
			return 0;
		c->sockets++;
		if (BPF_CORE_READ(sk, sk_protocol) == IPPROTO_TCP &&
		    BPF_CORE_READ(sk, sk_type) == SOCK_STREAM) {
			struct tcp_sock *tp = (void *)sk;

			c->received += BPF_CORE_READ(tp, bytes_received);
			c->acked += BPF_CORE_READ(tp, bytes_acked);
		}
		return 0;
	}
	case CT_ITER_UNIT:
		if (!sock_in_cgroup(sk, cfg->iter_budget, cfg->iter_tgid))
			return 0;
		fs.id = cfg->iter_budget;
		break;
	default:
		return 0;
	}
	ino = BPF_CORE_READ(f, f_inode, i_ino);
	if (!ino)
		return 0;
	fs.op = cfg->iter_op;
	fs.tgid = ns_tgid(t, cfg);
	if (!bpf_map_update_elem(&file_socks, &ino, &fs, BPF_ANY)) {
		/* the daemon runs the socket pass of each protocol found (an empty one still
		 * walks every bucket of the protocol's hash table) */
		__u32 proto = BPF_CORE_READ(sk, sk_protocol);

		bpf_seq_write(ctx->meta->seq, &proto, sizeof(proto));
	}
	return 0;
}

/* Tag a socket as file_socks says (sk: from iter/tcp or iter/udp); a budget it joins is
 * written to the iterator's output. */
static __always_inline void tag_file_sock(struct seq_file *seq, struct sock *sk)
{
	struct ct_file_sock *fs;
	struct ct_sk_tag *tag;
	__u64 ino, bid;

	ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	if (!ino)
		return;
	fs = bpf_map_lookup_elem(&file_socks, &ino);
	if (!fs)
		return;
	bid = fs->id;
	if (fs->op == CT_ITER_TAG && !bid) {
		tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);
		if (tag && tag->budget && tag->budget == fs->leaving)
			tag->budget = 0; /* released */
	} else {
		tag = bpf_sk_storage_get(&sk_tag, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	}
	if (tag && fs->op == CT_ITER_TAG && bid) {
		tag->tgid = fs->tgid;
		if (tag->budget != bid) {
			tag->budget = bid;
			bpf_seq_write(seq, &bid, sizeof(bid));
		}
	} else if (tag && fs->op == CT_ITER_UNIT) {
		if (!tag->tgid)
			tag->tgid = fs->tgid;
		tag->unit = fs->id;
	}
	bpf_map_delete_elem(&file_socks, &ino);
}

SEC("iter/tcp")
int ct_iter_tcp_files(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct ct_config *cfg = ct_cfg();
	struct tcp_sock *tp;

	if (!skc || !cfg || cfg->iter_op != CT_ITER_SOCKS)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (tp)
		tag_file_sock(ctx->meta->seq, (struct sock *)tp);
	return 0;
}

SEC("iter/udp")
int ct_iter_udp_files(struct bpf_iter__udp *ctx)
{
	struct udp_sock *us = ctx->udp_sk;
	struct ct_config *cfg = ct_cfg();

	if (!us || !cfg || cfg->iter_op != CT_ITER_SOCKS)
		return 0;
	tag_file_sock(ctx->meta->seq, (struct sock *)us);
	return 0;
}

/* ---- pacing (sock_ops, iter/tcp) ---------------------------------------------------------- */

struct caps {
	__u32 pace;    /* SO_MAX_PACING_RATE, CT_UNLIMITED_PACE for none */
	__u32 clamp;   /* TCP_WINDOW_CLAMP, 0 for none */
	__u32 limited;
	__u32 cwnd;    /* TCP_BPF_SNDCWND_CLAMP (segments), 0 for none */
};

/* caps.limited of a record iter/tcp writes when it registered a connection for pacing its
 * sender: run it once more (the sender may come earlier in the iteration) */
#define CT_CAPS_AGAIN 2
/* ... and of one per socket it released for an earlier daemon (CT_ITER_ORPHANS) */
#define CT_CAPS_ORPHAN 3

/* Segments a paced sender may have in flight: twice what its share needs over the RTT,
 * and never fewer than CT_MIN_CWND.  Without it, on short RTTs TCP builds one super-packet
 * of its whole window (up to 64 KB) and the pace shows as lumps; with it, each packet the
 * pacer releases is a few segments. */
#define CT_MIN_CWND 4
static __always_inline __u32 cwnd_for(__u32 pace, __u32 srtt_us, __u32 mss)
{
	__u64 bdp;

	if (!mss || pace == CT_UNLIMITED_PACE)
		return 0;
	bdp = (__u64)pace * srtt_us / USEC_PER_SEC;
	bdp = 2 * bdp / mss + 2;
	if (bdp < CT_MIN_CWND)
		bdp = CT_MIN_CWND;
	if (bdp > 65535)
		bdp = 65535;
	return (__u32)bdp;
}

/* A socket's share of one direction of a limit: the rate in force (the daemon's settings,
 * which the packet path copies in lazily) over the sockets active in it. */
static __always_inline __u64 share(struct ct_limit_cfg *c, struct ct_limit *l, int dir,
				   __u64 seen, __u64 now)
{
	__u64 rate = c->rate[dir & 1];

	if (!rate)
		return 0;
	return rate / bucket_divisor(&l->dir[dir & 1], seen, now);
}

static __always_inline void cap_pace(struct caps *c, __u64 rate)
{
	if (!rate)
		return;
	if (rate >= CT_UNLIMITED_PACE)
		rate = CT_UNLIMITED_PACE - 1;
	if (rate < c->pace)
		c->pace = (__u32)rate;
	c->limited = 1;
}

/* The receive window for a download share: a quarter second of it, never below
 * CT_MIN_CLAMP: enough to keep the share flowing at any RTT the queue adds, small enough
 * that a remote sender cannot overflow the budget's queue. */
static __always_inline void cap_clamp(struct caps *c, __u64 rate)
{
	__u64 w;

	if (!rate)
		return;
	w = rate / 4;
	if (w < CT_MIN_CLAMP)
		w = CT_MIN_CLAMP;
	if (w > CT_CLAMP_RELEASE)
		w = CT_CLAMP_RELEASE;
	if (!c->clamp || w < c->clamp)
		c->clamp = (__u32)w;
	c->limited = 1;
}

static __always_inline void caps_of(struct ct_sk_tag *tag, struct caps *c, __u64 now)
{
	struct ct_limit_cfg *lc;
	struct ct_limit *l;
	__u64 key, seen;

	c->pace = CT_UNLIMITED_PACE;
	c->clamp = 0;
	c->limited = 0;
	c->cwnd = 0;
	if (tag->budget) {
		key = tag->budget;
		l = bpf_map_lookup_elem(&limits, &key);
		lc = bpf_map_lookup_elem(&limit_cfg, &key);
		if (l && lc) {
			cap_pace(c, share(lc, l, CT_DIR_UPLOAD, tag->seen[CT_DIR_UPLOAD], now));
			cap_clamp(c, share(lc, l, CT_DIR_DOWNLOAD, tag->seen[CT_DIR_DOWNLOAD], now));
		} else {
			tag->budget = 0;
		}
	}
	if (tag->peer_budget) {
		/* a budget, or a unit limit (CT_CLASS_UNIT | cgroup id) */
		key = tag->peer_budget & ~CT_CLASS_UNIT;
		if (tag->peer_budget & CT_CLASS_UNIT) {
			l = bpf_map_lookup_elem(&unit_limits, &key);
			lc = bpf_map_lookup_elem(&unit_cfg, &key);
		} else {
			l = bpf_map_lookup_elem(&limits, &key);
			lc = bpf_map_lookup_elem(&limit_cfg, &key);
		}
		/* the peer's download is this socket's upload; activity is counted on the
		 * receiving side, where this connection already counts */
		seen = now / CT_EPOCH_NS;
		if (l && lc)
			cap_pace(c, share(lc, l, CT_DIR_DOWNLOAD, seen, now));
		else
			tag->peer_budget = 0;
	}
	if (tag->unit) {
		key = tag->unit;
		l = bpf_map_lookup_elem(&unit_limits, &key);
		lc = bpf_map_lookup_elem(&unit_cfg, &key);
		if (l && lc) {
			cap_pace(c, share(lc, l, CT_DIR_UPLOAD, tag->seen[CT_DIR_UPLOAD], now));
			cap_clamp(c, share(lc, l, CT_DIR_DOWNLOAD, tag->seen[CT_DIR_DOWNLOAD], now));
		} else {
			tag->unit = 0;
		}
	}
}

/* Worth a setsockopt?  Changes under 1/16 are left alone (shares wobble with activity). */
static __always_inline int differs(__u32 have, __u32 want)
{
	__u32 d;

	if (!have)
		return 1;
	d = have > want ? have - want : want - have;
	return d > (want >> 4);
}

/* Apply caps to a socket (ctx: a bpf_sock_ops or an iter/tcp socket).  A socket that was
 * capped and no longer is gets everything back: no pacing cap, no window clamp, and its
 * congestion control re-initialised (switched away and back) so it does not keep the
 * bandwidth estimate of its limited days. */
#define APPLY_CAPS(ctx, tag, c, released)                                                   \
	do {                                                                                \
		released = 0;                                                               \
		if ((c).limited) {                                                          \
			if (differs((tag)->paced, (c).pace)) {                              \
				__u32 v = (c).pace;                                         \
				if (!bpf_setsockopt(ctx, SOL_SOCKET, SO_MAX_PACING_RATE,    \
						    &v, sizeof(v)))                         \
					(tag)->paced = v;                                   \
			}                                                                   \
			if ((c).clamp && differs((tag)->clamp, (c).clamp)) {                \
				int v = (c).clamp;                                          \
				if (!bpf_setsockopt(ctx, SOL_TCP, TCP_WINDOW_CLAMP, &v,     \
						    sizeof(v)))                             \
					(tag)->clamp = v;                                   \
			}                                                                   \
			if ((c).cwnd && (c).cwnd != (tag)->cwnd) {                          \
				int v = (c).cwnd;                                           \
				if (!bpf_setsockopt(ctx, SOL_TCP, TCP_BPF_SNDCWND_CLAMP,    \
						    &v, sizeof(v)))                         \
					(tag)->cwnd = v;                                    \
			}                                                                   \
		} else if ((tag)->paced || (tag)->clamp) {                                  \
			__u32 v = CT_UNLIMITED_PACE;                                        \
			int w = CT_CLAMP_RELEASE;                                           \
			char cc[16] = {}, reno[16] = "reno";                                \
			bpf_setsockopt(ctx, SOL_SOCKET, SO_MAX_PACING_RATE, &v, sizeof(v)); \
			if ((tag)->clamp)                                                   \
				bpf_setsockopt(ctx, SOL_TCP, TCP_WINDOW_CLAMP, &w,          \
					       sizeof(w));                                  \
			if ((tag)->cwnd) {                                                  \
				int cw = CT_CWND_RELEASE;                                   \
				bpf_setsockopt(ctx, SOL_TCP, TCP_BPF_SNDCWND_CLAMP, &cw,    \
					       sizeof(cw));                                 \
			}                                                                   \
			if (!bpf_getsockopt(ctx, SOL_TCP, TCP_CONGESTION, cc, sizeof(cc)) && \
			    !bpf_setsockopt(ctx, SOL_TCP, TCP_CONGESTION, reno, sizeof(reno))) \
				bpf_setsockopt(ctx, SOL_TCP, TCP_CONGESTION, cc, sizeof(cc)); \
			(tag)->paced = 0;                                                   \
			(tag)->clamp = 0;                                                   \
			(tag)->cwnd = 0;                                                    \
			released = 1;                                                       \
		}                                                                           \
	} while (0)

static __always_inline void peer_key_of(struct bpf_sock_ops *ops, struct ct_peer_key *k,
					int reversed)
{
	__u32 lport = ops->local_port, rport = bpf_ntohl(ops->remote_port) & 0xffff;

	k->family = ops->family;
	if (!reversed) {
		k->ports = lport << 16 | rport;
		if (ops->family == AF_INET) {
			k->local[0] = ops->local_ip4;
			k->remote[0] = ops->remote_ip4;
		} else { /* ctx fields take constant offsets only */
			k->local[0] = ops->local_ip6[0];
			k->local[1] = ops->local_ip6[1];
			k->local[2] = ops->local_ip6[2];
			k->local[3] = ops->local_ip6[3];
			k->remote[0] = ops->remote_ip6[0];
			k->remote[1] = ops->remote_ip6[1];
			k->remote[2] = ops->remote_ip6[2];
			k->remote[3] = ops->remote_ip6[3];
		}
	} else {
		k->ports = rport << 16 | lport;
		if (ops->family == AF_INET) {
			k->local[0] = ops->remote_ip4;
			k->remote[0] = ops->local_ip4;
		} else {
			k->local[0] = ops->remote_ip6[0];
			k->local[1] = ops->remote_ip6[1];
			k->local[2] = ops->remote_ip6[2];
			k->local[3] = ops->remote_ip6[3];
			k->remote[0] = ops->local_ip6[0];
			k->remote[1] = ops->local_ip6[1];
			k->remote[2] = ops->local_ip6[2];
			k->remote[3] = ops->local_ip6[3];
		}
	}
}

/* A limited connection: register it so its sender, if it is a socket on this host, is found
 * and paced when it becomes established (its key is the sender's view of the tuple). */
static __always_inline void register_peer(struct bpf_sock_ops *ops, struct ct_sk_tag *tag,
					  __u64 bid)
{
	struct ct_peer_key k = {};

	peer_key_of(ops, &k, 1);
	if (bpf_map_update_elem(&peer_pace, &k, &bid, BPF_ANY))
		count_full(CT_FULL_PEERS, tag->tgid, 0);
	else
		tag->flags |= CT_SK_PEER_REG;
}

static __always_inline void unregister_peer(struct bpf_sock_ops *ops, struct ct_sk_tag *tag)
{
	struct ct_peer_key k = {};

	peer_key_of(ops, &k, 1);
	bpf_map_delete_elem(&peer_pace, &k);
	tag->flags &= ~CT_SK_PEER_REG;
}

/* Callbacks of a limited socket: every RTT sample (re-divide the budget) and state changes
 * (forget it at close); a socket with a bounded receive window also every received packet,
 * now and then, to put the bound back: the kernel's receive-buffer tuning raises it. */
#define CT_CB_FLAGS (BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG | \
		     BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)
#define CT_RECLAMP_EVERY 16

static __always_inline void callbacks_on(struct bpf_sock_ops *ops, struct ct_sk_tag *tag)
{
	if (!(tag->flags & CT_SK_CB) && !bpf_sock_ops_cb_flags_set(ops, CT_CB_FLAGS))
		tag->flags |= CT_SK_CB;
}

static __always_inline int unit_download(struct ct_sk_tag *tag)
{
	__u64 key = tag->unit;
	struct ct_limit_cfg *uc = bpf_map_lookup_elem(&unit_cfg, &key);

	return uc && uc->rate[CT_DIR_DOWNLOAD];
}

static __always_inline int limited_download(struct ct_sk_tag *tag)
{
	__u64 key = tag->budget;
	struct ct_limit_cfg *lc;

	if (!key)
		return 0;
	lc = bpf_map_lookup_elem(&limit_cfg, &key);
	return lc && lc->rate[CT_DIR_DOWNLOAD];
}

SEC("sockops")
int ct_sockops(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	struct ct_config *cfg;
	struct ct_limit_cfg *lc;
	struct ct_sk_tag *tag;
	struct caps c;
	__u64 now, key;
	int released;

	if (!sk || (ops->family != AF_INET && ops->family != AF_INET6))
		return 1;
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_RTT_CB:
	case BPF_SOCK_OPS_STATE_CB:
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		break;
	default:
		return 1;
	}
	tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);
	if (ops->op == BPF_SOCK_OPS_PARSE_HDR_OPT_CB) {
		if (tag && tag->clamp && ++tag->rx % CT_RECLAMP_EVERY == 0) {
			int v = tag->clamp;

			bpf_setsockopt(ops, SOL_TCP, TCP_WINDOW_CLAMP, &v, sizeof(v));
		}
		return 1;
	}
	if (ops->op == BPF_SOCK_OPS_STATE_CB) {
		if (tag && (tag->flags & CT_SK_PEER_REG) && ops->args[1] == TCP_CLOSE)
			unregister_peer(ops, tag);
		return 1;
	}
	cfg = ct_cfg();
	if (!cfg)
		return 1;
	if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && (cfg->flags & CT_CFG_PEERS) &&
	    !(tag && tag->budget)) {
		/* is this the sender of a limited connection on this host? */
		struct ct_peer_key k = {};
		__u64 *pb;

		peer_key_of(ops, &k, 0);
		pb = bpf_map_lookup_elem(&peer_pace, &k);
		if (pb) {
			if (!tag)
				tag = bpf_sk_storage_get(&sk_tag, sk, 0,
							 BPF_SK_STORAGE_GET_F_CREATE);
			if (tag)
				tag->peer_budget = *pb;
		}
	}
	if (!tag || !(tag->budget || tag->peer_budget || tag->unit || tag->paced))
		return 1;
	now = bpf_ktime_get_ns();
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* before the SYN: a small MSS for low limits (smooth at any rate), and the
		 * connection registered for pacing its local sender */
		key = tag->budget;
		lc = key ? bpf_map_lookup_elem(&limit_cfg, &key) : 0;
		if (lc && lc->mss) {
			int mss = lc->mss;

			bpf_setsockopt(ops, SOL_TCP, TCP_MAXSEG, &mss, sizeof(mss));
		}
		if (tag->budget && (cfg->flags & CT_CFG_PEERS) && limited_download(tag))
			register_peer(ops, tag, tag->budget);
		callbacks_on(ops, tag);
		/* caps before the SYN: a receive window bounded now never grows past it (once
		 * advertised, a window cannot be taken back) */
		caps_of(tag, &c, now);
		c.cwnd = cwnd_for(c.pace, 0, ops->mss_cache);
		APPLY_CAPS(ops, tag, c, released);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !tag->budget && tag->unit &&
		    (cfg->flags & CT_CFG_PEERS) && !(tag->flags & CT_SK_PEER_REG) &&
		    unit_download(tag)) {
			/* a connection of a unit with a download limit (its tag learnt the unit
			 * from the SYN-ACK): its local sender, which the final ACK establishes
			 * next, is paced to the unit's share */
			register_peer(ops, tag, tag->unit | CT_CLASS_UNIT);
		}
		if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && tag->budget &&
		    (cfg->flags & CT_CFG_PEERS) && limited_download(tag)) {
			/* its sender (if local) was established before: the daemon finds it */
			register_peer(ops, tag, tag->budget);
			emit(CT_EV_PEER, tag->tgid, tag->budget, 0, 0, 0);
		}
		callbacks_on(ops, tag);
		/* fall through */
	case BPF_SOCK_OPS_RTT_CB:
		caps_of(tag, &c, now);
		c.cwnd = cwnd_for(c.pace, ops->srtt_us >> 3, ops->mss_cache);
		APPLY_CAPS(ops, tag, c, released);
		if (released && !tag->budget && !tag->peer_budget && !tag->unit &&
		    (tag->flags & CT_SK_CB)) {
			bpf_sock_ops_cb_flags_set(ops, 0);
			tag->flags &= ~CT_SK_CB;
		}
		{
			struct ct_global *g = ct_stats();

			if (g && tag->paced && ops->op != BPF_SOCK_OPS_RTT_CB)
				g->paced++;
		}
		break;
	}
	return 1;
}

/* Re-pace every socket the daemon's last change affects, at once: limits set on running
 * processes, limits raised or cleared, local senders whose limited peer was established
 * before them.  Sockets paced before and no longer limited are released. */
/* A socket an earlier daemon limited: its tag went with that daemon's maps (a crash, a
 * SIGKILL), its caps did not.  Only a sock_ops program sets callback flags, and ours set
 * exactly CT_CB_FLAGS on every socket they cap (and clear them when they release it): an
 * untagged socket carrying them is released as a limit that ended would be. */
static __always_inline void release_orphan(struct bpf_iter__tcp *ctx, struct tcp_sock *tp)
{
	struct caps done = { .limited = CT_CAPS_ORPHAN };
	__u32 pace = CT_UNLIMITED_PACE;
	int clamp = CT_CLAMP_RELEASE, cwnd = CT_CWND_RELEASE, none = 0;
	char cc[16] = {}, reno[16] = "reno";

	bpf_setsockopt(tp, SOL_SOCKET, SO_MAX_PACING_RATE, &pace, sizeof(pace));
	bpf_setsockopt(tp, SOL_TCP, TCP_WINDOW_CLAMP, &clamp, sizeof(clamp));
	bpf_setsockopt(tp, SOL_TCP, TCP_BPF_SNDCWND_CLAMP, &cwnd, sizeof(cwnd));
	if (!bpf_getsockopt(tp, SOL_TCP, TCP_CONGESTION, cc, sizeof(cc)) &&
	    !bpf_setsockopt(tp, SOL_TCP, TCP_CONGESTION, reno, sizeof(reno)))
		bpf_setsockopt(tp, SOL_TCP, TCP_CONGESTION, cc, sizeof(cc));
	bpf_setsockopt(tp, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, &none, sizeof(none));
	bpf_seq_write(ctx->meta->seq, &done, sizeof(done));
}

SEC("iter/tcp")
int ct_iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct ct_config *cfg = ct_cfg();
	struct ct_sk_tag *tag;
	struct tcp_sock *tp;
	struct caps c;
	int released;

	if (!skc || !cfg)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	tag = bpf_sk_storage_get(&sk_tag, tp, 0, 0);
	if ((cfg->flags & CT_CFG_PEERS) && !(tag && (tag->budget || tag->peer_budget))) {
		struct ct_peer_key k = {};
		__u64 *pb;
		__u16 fam = skc->skc_family;

		k.family = fam;
		k.ports = (__u32)skc->skc_num << 16 | bpf_ntohs(skc->skc_dport);
		if (fam == AF_INET) {
			k.local[0] = skc->skc_rcv_saddr;
			k.remote[0] = skc->skc_daddr;
		} else if (fam == AF_INET6) {
			for (int i = 0; i < 4; i++) {
				k.local[i] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[i];
				k.remote[i] = skc->skc_v6_daddr.in6_u.u6_addr32[i];
			}
		}
		pb = bpf_map_lookup_elem(&peer_pace, &k);
		if (pb) {
			if (!tag)
				tag = bpf_sk_storage_get(&sk_tag, tp, 0,
							 BPF_SK_STORAGE_GET_F_CREATE);
			if (tag)
				tag->peer_budget = *pb;
		}
	}
	if (!tag) {
		if (cfg->iter_op == CT_ITER_ORPHANS && tp->bpf_sock_ops_cb_flags == CT_CB_FLAGS)
			release_orphan(ctx, tp);
		return 0;
	}
	if (!(tag->budget || tag->peer_budget || tag->unit || tag->paced || tag->clamp))
		return 0;
	if (tag->budget && !(tag->flags & CT_SK_PEER_REG) && (cfg->flags & CT_CFG_PEERS) &&
	    limited_download(tag) && skc->skc_state == 1 /* TCP_ESTABLISHED */) {
		/* a connection older than its limit: register it now, so its sender, if it is
		 * a socket on this host, is paced (the daemon runs this iterator once more) */
		struct ct_peer_key k = {};
		__u64 bid = tag->budget;
		__u16 fam = skc->skc_family;

		k.family = fam;
		k.ports = (__u32)bpf_ntohs(skc->skc_dport) << 16 | skc->skc_num;
		if (fam == AF_INET) {
			k.local[0] = skc->skc_daddr;
			k.remote[0] = skc->skc_rcv_saddr;
		} else {
			for (int i = 0; i < 4; i++) {
				k.local[i] = skc->skc_v6_daddr.in6_u.u6_addr32[i];
				k.remote[i] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[i];
			}
		}
		if (!bpf_map_update_elem(&peer_pace, &k, &bid, BPF_ANY)) {
			struct caps again = { .limited = CT_CAPS_AGAIN };

			tag->flags |= CT_SK_PEER_REG;
			bpf_seq_write(ctx->meta->seq, &again, sizeof(again));
		}
	}
	caps_of(tag, &c, bpf_ktime_get_ns());
	c.cwnd = cwnd_for(c.pace, tp->srtt_us >> 3, tp->mss_cache);
	APPLY_CAPS(tp, tag, c, released);
	if (c.limited && !(tag->flags & CT_SK_CB)) {
		int f = CT_CB_FLAGS;

		if (!bpf_setsockopt(tp, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, &f, sizeof(f)))
			tag->flags |= CT_SK_CB;
	} else if (released && (tag->flags & CT_SK_CB) && !tag->budget && !tag->peer_budget &&
		   !tag->unit) {
		int f = 0;

		bpf_setsockopt(tp, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, &f, sizeof(f));
		tag->flags &= ~CT_SK_CB;
	}
	if (c.limited)
		bpf_seq_write(ctx->meta->seq, &c, sizeof(c));
	return 0;
}

/* A limited process may lower its sockets' caps, never lift them. */
SEC("cgroup/setsockopt")
int ct_setsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct ct_sk_tag *tag;
	__u32 cap = 0;

	if (!sk)
		return 1;
	if (ctx->level == SOL_SOCKET && ctx->optname == SO_MAX_PACING_RATE) {
		tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);
		if (tag && tag->paced && tag->paced != CT_UNLIMITED_PACE)
			cap = tag->paced;
	} else if (ctx->level == SOL_TCP && ctx->optname == TCP_WINDOW_CLAMP) {
		tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);
		if (tag && tag->clamp)
			cap = tag->clamp;
	}
	if (!cap)
		return 1;
	if (ctx->optlen == 8) {
		__u64 *v = ctx->optval;

		if ((void *)(v + 1) > ctx->optval_end)
			return 0;
		if (*v > cap || *v == 0)
			*v = cap;
	} else if (ctx->optlen == 4) {
		__u32 *v = ctx->optval;

		if ((void *)(v + 1) > ctx->optval_end)
			return 0;
		if (*v > cap || *v == 0)
			*v = cap;
	}
	return 1;
}

/* ---- remote downloads: classify into the budget's queue (tc ingress of an uplink) ------ */

/* Attached in direct-action mode (libbpf's bpf_tc_attach): a packet of a limited socket gets
 * its class in skb->priority and is redirected to the egress of the device's ifb, where htb
 * holds it; every other packet goes on (TC_ACT_UNSPEC: the next filter, if any, decides).
 * ifb accepts packets redirected by bpf_redirect since Linux 6.4 (__bpf_tx_skb marks them
 * redirected from ingress); the daemon makes no queue on older kernels. */
SEC("classifier")
int ct_tc_classify(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk = 0;
	struct ct_sk_tag *tag;
	struct ct_device *dev;
	__u32 *minor = 0, tsize, ifindex;
	__u8 proto;
	__u64 key;
	struct ethhdr *eth = data;
	void *l4;

	if ((void *)(eth + 1) > end)
		return CT_TC_NEXT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return CT_TC_NEXT;
		proto = ip->protocol;
		l4 = (void *)ip + ip->ihl * 4;
		t.ipv4.saddr = ip->saddr;
		t.ipv4.daddr = ip->daddr;
		tsize = sizeof(t.ipv4);
		if (l4 + 4 > end)
			return CT_TC_NEXT;
		t.ipv4.sport = *(__be16 *)l4;
		t.ipv4.dport = *(__be16 *)(l4 + 2);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return CT_TC_NEXT;
		proto = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
		__builtin_memcpy(t.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &ip6->daddr, 16);
		tsize = sizeof(t.ipv6);
		if (l4 + 4 > end)
			return CT_TC_NEXT;
		t.ipv6.sport = *(__be16 *)l4;
		t.ipv6.dport = *(__be16 *)(l4 + 2);
	} else {
		return CT_TC_NEXT;
	}
	if (proto == IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(skb, &t, tsize, BPF_F_CURRENT_NETNS, 0);
	else if (proto == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(skb, &t, tsize, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return CT_TC_NEXT;
	tag = bpf_sk_storage_get(&sk_tag, sk, 0, 0);
	key = 0;
	if (tag && tag->budget) {
		key = tag->budget;
		minor = bpf_map_lookup_elem(&dl_class, &key);
	}
	if (!minor && tag && tag->unit) {
		key = tag->unit | CT_CLASS_UNIT;
		minor = bpf_map_lookup_elem(&dl_class, &key);
		if (!minor) {
			__u64 u = tag->unit;
			struct ct_limit *ul = bpf_map_lookup_elem(&unit_limits, &u);

			if (ul && ul->dir[CT_DIR_DOWNLOAD].rate &&
			    !(ul->flags & CT_LIMIT_CLASS_ASKED)) {
				ul->flags |= CT_LIMIT_CLASS_ASKED;
				emit(CT_EV_CLASS, 0, u, 1, 0, 0);
			}
		}
	} else if (!minor && key) {
		struct ct_limit *l = bpf_map_lookup_elem(&limits, &key);

		if (l && l->dir[CT_DIR_DOWNLOAD].rate && !(l->flags & CT_LIMIT_CLASS_ASKED)) {
			l->flags |= CT_LIMIT_CLASS_ASKED;
			emit(CT_EV_CLASS, 0, key, 0, 0, 0);
		}
	}
	bpf_sk_release(sk);
	if (!minor)
		return CT_TC_NEXT;
	ifindex = skb->ingress_ifindex;
	dev = bpf_map_lookup_elem(&dl_devices, &ifindex);
	if (!dev || dev->state != CT_DEV_QUEUED || !dev->ifb)
		return CT_TC_NEXT; /* its queue is being made: the grace lets it pass meanwhile */
	/* htb on the ifb picks the class from skb->priority (htb_classify); the ifb hands the
	 * packet back to this device's receive path once the class releases it */
	skb->priority = TC_H_MAJ_1 | (*minor & 0xffff);
	return bpf_redirect(dev->ifb, 0);
}

char LICENSE[] SEC("license") = "GPL";
