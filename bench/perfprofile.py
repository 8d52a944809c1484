"""Where the time goes: `perf record` (cpu-clock sampling; this VM has no hardware counters) on
the pinned CPU during a 64 B ping-pong, folded into a few categories, in µs per round trip."""

import re

# First match wins; order matters (a bpf helper named tcp_bpf_* is sockmap work, not TCP).
CATEGORIES = [
    ("idle", re.compile(r"^(cpuidle|default_idle|intel_idle|poll_idle|do_idle|cpu_startup_entry|acpi_idle|mwait_idle|pv_native_safe_halt|native_safe_halt|arch_cpu_idle)")),
    ("sockmap / BPF", re.compile(r"(bpf|sk_psock|sk_msg|tcp_bpf|sock_map|sock_hash|skmsg)")),
    ("netfilter (iptables, conntrack, NAT)", re.compile(r"^(nf_|nft_|ipt_|xt_|iptable_|ipv4_conntrack|__nf_|nf_nat|nf_ct|ct_|nf_hook|ipt_do_table|__ipt)")),
    ("memcpy (user <-> kernel)", re.compile(r"(copy_user|copy_to_iter|copy_from_iter|_copy_|rep_movs|memcpy|memmove|skb_copy_datagram)")),
    ("TCP/IP stack, veth, bridge, loopback", re.compile(r"^(bbr_|cubictcp|fdb_|passthru_features_check|_*local_bh_enable|do_softirq|__do_softirq|handle_softirqs|net_rx_action|_*tcp|_*ip_|_*ip6?_|inet|_*sk_|sock_|_*skb|kfree_skb|_*dev_|_*netif|net_rx|process_backlog|veth|br_|loopback|napi|__napi|_*neigh|eth_|fib_|dst_|raw_|validate_xmit|__qdisc|sch_|rt_|lock_sock|release_sock|__release_sock|__inet|security_sock|selinux_|__sys_sendto|__sys_recvfrom|__sys_sendmsg|__sys_recvmsg|__sock_)")),
    ("timekeeping (clock_gettime, CPU clocks)", re.compile(r"^(read_tsc|ktime_get|thread_cpu_clock|posix_cpu|cpu_clock_sample|__vdso_clock|clock_gettime|kvm_clock|pvclock)")),
    ("syscall entry, epoll, poll", re.compile(r"^(exit_to_user_mode|__rseq_handle|rseq_|its_return_thunk|__x86_indirect_thunk|__x86_return_thunk|entry_|do_syscall|__x64_sys|syscall_|__do_sys|ep_|__ep|do_epoll|epoll|__fget|fput|__fdget|do_select|do_sys_poll|__se_sys|sys_|core_sys_select|__pollwait|fdget|x64_sys_call|__x64_)")),
    # cpu-clock samples taken while interrupts were off land where they are turned back on
    # (spin_unlock_irqrestore, finish_task_switch): mostly wake-up and context-switch work.
    ("scheduler, context switches, wake-ups", re.compile(r"(_raw_spin_unlock_irq|_raw_spin_lock|schedule|ttwu|wake_up|enqueue|dequeue|pick_next|task_|update_curr|update_load|switch_to|finish_task|__switch|resched|sched|hrtick|psi_|__wake|autoremove_wake|prepare_to_wait|finish_wait|irqentry|asm_|irq_|rcu_|timer|hrtimer|tick_|ktime)")),
]


def categorize(comm, dso, sym):
    """One sample's category from its command, object and symbol."""
    s = sym.strip()
    if s.startswith("[k] ") or dso.strip() == "[kernel.kallsyms]":
        s = s.removeprefix("[k] ").strip()
        for name, rx in CATEGORIES:
            if rx.search(s):
                return name
        return "kernel, other"
    comm = comm.strip()
    if comm == "haproxy":
        return "user space: sidecars (HAProxy)"
    if comm.startswith("sockperf"):
        return "user space: sockperf"
    return "user space: other"


def parse_perf_report(text):
    """Rows of `perf report -n --stdio --no-children -s comm,dso,sym -g none -t ';'`:
    [(samples, comm, dso, sym)]."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(";")
        if len(parts) < 5:
            continue
        try:
            samples = int(parts[1].strip())
        except ValueError:
            continue
        rows.append((samples, parts[2].strip(), parts[3].strip(), ";".join(parts[4:]).strip()))
    return rows


def breakdown(rows, freq_hz, round_trips, only_comms=None):
    """µs of CPU per round trip in each category (idle left out), from sampled rows.
    `only_comms`: count only samples of these commands (the path's processes)."""
    if not round_trips:
        return {}
    out = {}
    for samples, comm, dso, sym in rows:
        if only_comms is not None and not any(comm.startswith(c) for c in only_comms):
            continue
        cat = categorize(comm, dso, sym)
        if cat == "idle":
            continue
        out[cat] = out.get(cat, 0.0) + samples / freq_hz * 1e6 / round_trips
    return out


def top_symbols(rows, n=12, only_comms=None):
    agg = {}
    for samples, comm, dso, sym in rows:
        if only_comms is not None and not any(comm.startswith(c) for c in only_comms):
            continue
        if categorize(comm, dso, sym) == "idle":
            continue
        key = f"{comm} {sym}"
        agg[key] = agg.get(key, 0) + samples
    total = sum(agg.values()) or 1
    return [(k, v / total * 100) for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:n]]


def top_in_category(rows, category, n=15, only_comms=None):
    """The heaviest symbols of one category (to see what "kernel, other" holds)."""
    agg = {}
    for samples, comm, dso, sym in rows:
        if only_comms is not None and not any(comm.startswith(c) for c in only_comms):
            continue
        if categorize(comm, dso, sym) == category:
            agg[sym] = agg.get(sym, 0) + samples
    return sorted(agg.items(), key=lambda kv: -kv[1])[:n]
