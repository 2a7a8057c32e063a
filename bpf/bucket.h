/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The token bucket of one direction of a budget or unit limit (called under the limit's
 * bpf_spin_lock; no helper call may happen while it is held).
 */
#ifndef CHADTHROTTLE_BUCKET_H
#define CHADTHROTTLE_BUCKET_H

#define NSEC_PER_SEC 1000000000ULL
#define USEC_PER_SEC 1000000ULL
#define NSEC_PER_USEC 1000ULL

/* Tokens a direction starts with when it becomes limited: nearly empty, so the first second
 * holds the rate plus at most one packet. */
#define CT_INITIAL_TOKENS 1

/* Refill for the time since the last refill.  Debt (negative tokens) is paid back at the
 * rate, never forgiven, however long the pause: a flow that backs off still holds its
 * average.  Only whole bytes are credited, and last_ns advances by exactly the time they
 * represent, so no fraction of a byte is lost between refills (1 KiB/s stays 1 KiB/s). */
static __always_inline void bucket_refill(struct ct_bucket *b, __u64 now)
{
	__s64 room;
	__u64 el_us, need_us, add;

	if (now <= b->last_ns)
		return;
	room = (__s64)b->burst - b->tokens;
	if (room <= 0) {
		b->last_ns = now;
		return;
	}
	el_us = (now - b->last_ns) / NSEC_PER_USEC;
	/* room <= burst + one packet of debt < 2^42, so room * 10^6 < 2^62 */
	need_us = (__u64)room * USEC_PER_SEC / b->rate + 1;
	if (el_us >= need_us) {
		b->tokens = (__s64)b->burst;
		b->last_ns = now;
		return;
	}
	/* el_us < need_us: el_us * rate < room * 10^6 + rate < 2^63 */
	add = el_us * b->rate / USEC_PER_SEC;
	if (!add)
		return;
	b->tokens += (__s64)add;
	if (add < (1ULL << 33)) /* add * 10^9 < 2^63 */
		b->last_ns += add * NSEC_PER_SEC / b->rate;
	else
		b->last_ns += el_us * NSEC_PER_USEC;
}

/* Count a socket as active in this epoch (the pacing divisor). */
static __always_inline void bucket_epoch(struct ct_bucket *b, __u64 now, int fresh)
{
	__u64 ep = now / CT_EPOCH_NS;

	if (b->epoch != ep) {
		b->active = (ep == b->epoch + 1) ? b->counting : 0;
		b->counting = 0;
		b->epoch = ep;
	}
	if (fresh)
		b->counting++;
}

/* Charge `len` payload bytes; 1 = pass, 0 = drop, 2 = passed by grace.  Packets without
 * payload (pure ACKs, SYNs, FINs) always pass: starving the acknowledgements of one
 * direction would stall the other.  A packet passes while the debt is within the slack;
 * beyond it, with `grace`, it passes and the debt is forgiven (the download queue is being
 * made: the bucket must not start that queue in debt). */
static __always_inline int bucket_charge(struct ct_bucket *b, __u64 len, __u64 now, int fresh,
					 int grace)
{
	int pass = 1;

	b->calls++;
	if (b->rate) {
		bucket_refill(b, now);
		if (len) {
			bucket_epoch(b, now, fresh);
			if (b->tokens > -(__s64)b->slack)
				b->tokens -= (__s64)len;
			else if (grace)
				pass = 2, b->tokens = 0; /* and the queue starts without debt */
			else
				pass = 0;
		}
	}
	if (pass) {
		b->passed_bytes += len;
		b->passed_packets++;
	} else {
		b->dropped_bytes += len;
		b->dropped_packets++;
	}
	return pass;
}

/* Copy new settings in (under the lock).  A direction that becomes limited starts nearly
 * empty; a changed one keeps its tokens (clamped to the new depth). */
static __always_inline void bucket_settings(struct ct_bucket *b, __u64 rate, __u64 burst,
					    __u64 slack, __u64 now)
{
	if (rate && !b->rate) {
		b->tokens = CT_INITIAL_TOKENS;
		b->last_ns = now;
	}
	b->rate = rate;
	b->burst = burst;
	b->slack = slack;
	if (b->tokens > (__s64)burst)
		b->tokens = (__s64)burst;
}

/* Sockets to divide a direction's rate among: those active in the last or the current
 * epoch, plus the asking socket if it has not been counted yet. */
static __always_inline __u32 bucket_divisor(const struct ct_bucket *b, __u64 seen, __u64 now)
{
	__u64 ep = now / CT_EPOCH_NS;
	__u32 n = 0;

	if (b->epoch == ep)
		n = b->active > b->counting ? b->active : b->counting;
	else if (b->epoch + 1 == ep)
		n = b->counting;
	if (seen + 1 < ep || !seen)
		n++;
	return n ? n : 1;
}

#endif /* CHADTHROTTLE_BUCKET_H */
