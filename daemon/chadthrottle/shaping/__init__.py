"""Shaping: how a limit is held without dropping.

* ``pacing``: TCP sockets of a budget are paced (SO_MAX_PACING_RATE) to their share of the
  budget, from the kernel (sock_ops at connection events and every RTT sample; iter/tcp when
  the daemon changes something); low limits give new connections a small MSS so the pace is
  smooth; local senders of limited connections are paced the same way.
* ``queues``: packets of remote senders wait in the budget's own queue (an htb class on an
  ifb device the daemon owns) instead of being dropped; receive windows are bounded so the
  queue cannot overflow.

The token bucket in the packet path (budgets) stays the exact backstop for UDP and for
anything pacing and queueing miss.
"""
