"""The fastpath accelerator as the bench drives it: `install-cni` loads and pins the probes,
the plugin enrolls the accelerated pods, the per-pod counters prove every hop was redirected.

Until the accelerator lands in main, `start()` says why it is unavailable and the bench runs
without the accelerated column.
"""

from pathlib import Path


def counter_delta(before, after):
    """Per-pod counter increase between two snapshots {pod: {counter: n}}."""
    out = {}
    for pod, counters in after.items():
        prev = before.get(pod, {})
        out[pod] = {k: v - prev.get(k, 0) for k, v in counters.items()}
    return out


class Accelerator:
    def __init__(self, root, state_dir):
        self.root = Path(root)
        self.state = Path(state_dir)
        self.installer = self.root / "target/release/install-cni"

    def start(self):
        """Returns (True, None) when the probes are loaded and attached, else (False, why)."""
        if not self.installer.is_file():
            return False, "install-cni is not built"
        return False, "the accelerator has not landed in main yet (install-cni loads no probes)"

    def describe(self):
        return {}

    def enroll(self, node, pod):
        pass

    def unenroll(self, node, pod):
        pass

    def counters(self, node, pair):
        return {}

    def stop(self):
        pass
