"""Unit tests of the bench's pure parts (parsers, schedule, summaries). No root needed:
    /usr/bin/python3 -m unittest discover -s bench -p 'test_*.py'
"""

import json
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accel  # noqa: E402
import loadgen  # noqa: E402
import perfprofile  # noqa: E402
import plan  # noqa: E402
from mesh import parse_haproxy_frontend_sessions  # noqa: E402

SOCKPERF = """\
sockperf: [Total Run] RunTime=4.000 sec; Warm up time=400 msec; SentMessages=98892; ReceivedMessages=98891
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=3.552 sec; SentMessages=48930; ReceivedMessages=48929
sockperf: \x1b[2;35m====> avg-rtt=11.250 (std-dev=167.085)\x1b[0m
sockperf: # dropped messages = 0; # duplicated messages = 1; # out-of-order messages = 2
sockperf: ---> <MAX> observation = 9452.377
sockperf: ---> percentile 99.999 = 9452.377
sockperf: ---> percentile 99.900 = 3452.591
sockperf: ---> percentile 99.000 =    6.098
sockperf: ---> percentile 90.000 =    5.544
sockperf: ---> percentile 50.000 =    4.703
sockperf: ---> <MIN> observation =    4.411
"""

WRK = """\
Running 2s test @ http://10.246.0.5:8080/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   150.00us  500.00us  10.00ms   99.00%
  Latency Distribution
     50%  125.00us
     75%  132.00us
     90%    1.52ms
     99%    2.00s
  114896 requests in 2.10s, 18.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  54710.56
Transfer/sec:      8.57MB
"""


class Parsers(unittest.TestCase):
    def test_sockperf(self):
        m = loadgen.parse_sockperf(SOCKPERF)
        self.assertEqual(m["p50_us"], 4.703)
        self.assertEqual(m["p99_us"], 6.098)
        self.assertEqual(m["p99_9_us"], 3452.591)
        self.assertEqual(m["round_trips"], 48929)
        self.assertEqual(m["round_trips_total"], 98891)
        self.assertEqual((m["dropped"], m["duplicated"], m["out_of_order"]), (0, 1, 2))
        self.assertAlmostEqual(m["round_trips_per_sec"], 48929 / 3.552)

    def test_sockperf_without_percentiles_is_an_error(self):
        with self.assertRaises(ValueError):
            loadgen.parse_sockperf("sockperf: ERROR: connection refused")

    def test_full_log(self):
        text = "header\npacket, txTime(sec), rxTime(sec), rtt(usec)\n0, 1.0, 1.1, 5.5\n1, 1.2, 1.3, 7.25\n------\n"
        self.assertEqual(loadgen.parse_sockperf_full_log(text), [5.5, 7.25])

    def test_compact_json_round_trips(self):
        import run

        doc = {"runs": [{"quantiles_us": [1.5, 2.25, -3e-05], "name": "x"}], "n": [1, 2]}
        text = run.compact_json(doc)
        self.assertEqual(json.loads(text), doc)
        self.assertIn("[1.5, 2.25, -3e-05]", text)

    def test_quantiles(self):
        q = loadgen.quantiles(list(range(101)), n=11)
        self.assertEqual(q, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
        self.assertEqual(loadgen.quantiles([]), [])

    def test_wrk_units(self):
        m = loadgen.parse_wrk(WRK)
        self.assertEqual(m["p50_us"], 125.0)
        self.assertEqual(m["p90_us"], 1520.0)
        self.assertEqual(m["p99_us"], 2e6)
        self.assertEqual(m["requests"], 114896)
        self.assertEqual(m["non_2xx"], 3)
        self.assertEqual(m["requests_per_sec"], 54710.56)

    def test_iperf3(self):
        doc = {"end": {"sum_received": {"bits_per_second": 5.5e9, "bytes": 1000, "seconds": 2.0}, "sum_sent": {"retransmits": 4}}}
        m = loadgen.parse_iperf3(json.dumps(doc))
        self.assertEqual((m["gbit_per_sec"], m["retransmits"]), (5.5, 4))
        with self.assertRaises(ValueError):
            loadgen.parse_iperf3(json.dumps({"error": "unable to connect"}))

    def test_haproxy_stats(self):
        csv = (
            "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin\n"
            "outbound,FRONTEND,,,0,1,4096,7,100\n"
            "original_dst_out,original_dst,0,0,0,1,,7,100\n"
            "inbound,FRONTEND,,,1,1,4096,3,50\n"
        )
        self.assertEqual(parse_haproxy_frontend_sessions(csv), {"outbound": 7, "inbound": 3})
        with self.assertRaises(ValueError):
            parse_haproxy_frontend_sessions("Unknown command")


class Profile(unittest.TestCase):
    def test_categories(self):
        c = perfprofile.categorize
        self.assertEqual(c("haproxy", "[kernel.kallsyms]", "[k] tcp_sendmsg_locked"), "TCP/IP stack, veth, bridge, loopback")
        self.assertEqual(c("haproxy", "[kernel.kallsyms]", "[k] tcp_bpf_sendmsg"), "sockmap / BPF")
        self.assertEqual(c("sockperf", "[kernel.kallsyms]", "[k] nf_nat_ipv4_out"), "netfilter (iptables, conntrack, NAT)")
        self.assertEqual(c("swapper", "[kernel.kallsyms]", "[k] default_idle"), "idle")
        self.assertEqual(c("haproxy", "haproxy", "[.] process_stream"), "user space: sidecars (HAProxy)")

    def test_breakdown_per_round_trip(self):
        report = (
            "# comment\n"
            " 50.00%;1000;haproxy;[kernel.kallsyms];[k] tcp_sendmsg\n"
            " 25.00%;500;swapper;[kernel.kallsyms];[k] default_idle\n"
            " 25.00%;500;rustc;rustc;[.] main\n"
        )
        rows = perfprofile.parse_perf_report(report)
        self.assertEqual(len(rows), 3)
        b = perfprofile.breakdown(rows, freq_hz=1000, round_trips=1000, only_comms=("haproxy", "swapper"))
        # 1000 samples at 1 kHz = 1 s of CPU over 1000 round trips = 1000 µs each; idle and rustc left out.
        self.assertEqual(b, {"TCP/IP stack, veth, bridge, loopback": 1000.0})


class Plan(unittest.TestCase):
    def test_schedule_covers_every_cell_reps_times_and_rotates(self):
        cells = plan.schedule(5, plan.MODES)
        self.assertEqual(len(cells), 5 * 2 * len(plan.tests()) * 3)
        self.assertEqual(len({c for c in cells}), len(cells))
        # Within one (rep, placement, test) the modes run back to back...
        first = cells[:3]
        self.assertEqual({c.mode for c in first}, set(plan.MODES))
        self.assertEqual(len({(c.rep, c.placement, c.test, c.size) for c in first}), 1)
        # ...and no mode is always first.
        leaders = {cells[i].mode for i in range(0, len(cells), 3)}
        self.assertEqual(leaders, set(plan.MODES))

    def test_summary_medians_and_ratios(self):
        runs = [
            {"test": "sockperf", "size": 64, "placement": "pinned", "mode": "mesh", "metrics": {"p50_us": v, "p99_us": 2 * v}}
            for v in (70.0, 72.0, 90.0)
        ] + [
            {"test": "sockperf", "size": 64, "placement": "pinned", "mode": "accel", "metrics": {"p50_us": v, "p99_us": 2 * v}}
            for v in (47.0, 48.0, 46.0)
        ] + [{"test": "sockperf", "size": 64, "placement": "pinned", "mode": "accel", "error": "boom"}]
        s = plan.summarise(runs)
        self.assertEqual(s[("sockperf", 64, "pinned", "mesh")]["p50_us"], 72.0)
        self.assertEqual(s[("sockperf", 64, "pinned", "accel")]["n"], 3)
        checks = {c[0]: c for c in plan.goal_checks(s)}
        what, r, goal, met = checks["p50 round trip, 64 B, pinned"]
        self.assertAlmostEqual(r, 72.0 / 47.0)
        self.assertTrue(met)
        self.assertIsNone(checks["stream throughput, pinned"][1])
        self.assertFalse(checks["stream throughput, pinned"][3])

    def test_unpinned_runs_split_by_placement(self):
        def run(placement, mode, p50):
            return {"test": "sockperf", "size": 64, "placement": placement, "mode": mode, "metrics": {"p50_us": p50, "p99_us": p50}}

        runs = [run("pinned", "mesh", 28.0), run("unpinned", "mesh", 29.0), run("unpinned", "mesh", 80.0), run("unpinned", "mesh", 30.0)]
        split = plan.unpinned_by_placement(runs)
        self.assertEqual(sorted(split[(64, "mesh", "one vCPU")]), [29.0, 30.0])
        self.assertEqual(split[(64, "mesh", "spread")], [80.0])

    def test_ratio_direction(self):
        self.assertEqual(plan.ratio(10.0, 5.0), 2.0)
        self.assertEqual(plan.ratio(5.0, 10.0, higher_is_better=True), 2.0)
        self.assertIsNone(plan.ratio(None, 1.0))
        self.assertIsNone(plan.ratio(0.0, 1.0))

    def test_pod_stats_fields_follow_the_common_crate(self):
        src = (Path(__file__).resolve().parent.parent / "common/src/lib.rs").read_text()
        fields = accel.pod_stats_fields(src)
        self.assertIn("msgs_redirected", fields)
        self.assertEqual(fields[0], "sockets_enrolled")

    def test_bpftool_percpu_dump_sums_cpus(self):
        def le(n):
            return [f"0x{b:02x}" for b in n.to_bytes(8, "little")]

        doc = [{"key": le(4097), "values": [{"cpu": 0, "value": le(3) + le(10)}, {"cpu": 1, "value": le(4) + le(20)}]}]
        self.assertEqual(accel.parse_bpftool_percpu_dump(doc, ("a", "b")), {4097: {"a": 7, "b": 30}})

    def test_counter_delta(self):
        d = accel.counter_delta({"a": {"msgs": 5}}, {"a": {"msgs": 9}, "b": {"msgs": 2}})
        self.assertEqual(d, {"a": {"msgs": 4}, "b": {"msgs": 2}})


if __name__ == "__main__":
    unittest.main()
