"""Guards of the training loop: stop cleanly and in time on SIGTERM/SIGINT/SIGHUP/SIGUSR1, skip NaN/inf updates.

A NaN/inf step skips its update: torch's fused AdamW skips inside its kernel (its found_inf input, as the
AMP grad scaler uses it), with no host sync; any other optimizer (Muon) reads the finite flag on the host
once and does not step at all, so a skipped step leaves every parameter and state bit for bit as it was.
Why a host read for Muon rather than a masked update on the device: it is exact by construction, keeps
torch.optim.Muon's own step under ddp (and ShardedMuon's under fsdp) unchanged, and needs no copies; an
undo from copies cost a copy of every Muon parameter and momentum each step (about 680 MB at 124M), and
a masked update would mean our own Muon under ddp too. The price is one wait for the device per step,
before the Muon step; with the default log_interval=1 the loop reads the loss on the host every step
anyway.

Test hooks (environment variables, read here only):
    GPT2_DEBUG_NAN_STEPS=3,4    the loss of steps 3 and 4 is NaN (so are their gradients)
    GPT2_DEBUG_STEP_DELAY=0.2   sleep this many seconds each step, so a test can signal a run mid-way
"""

import os
import signal
import time

import torch
import torch.distributed as dist

from gpt2_pretrain.distributed import STOP_SIGNALS, print0, stop_signals_blocked


class NonFiniteError(Exception):
    """Too many NaN/inf steps in a row: reported as one message, the run stops."""


class StopSignal:
    """SIGTERM/SIGINT/SIGHUP/SIGUSR1 (distributed.STOP_SIGNALS) only set a flag; under torchrun the ranks agree on it (max over ranks) at steps every
    rank knows, so all stop at the same step without a collective each step. A check also tells every rank the
    slowest rank's step time and longest pause (an evaluation or checkpoint and its step), from which they all
    pick the next check step alike: at most `every` steps on, fewer when steps are slow, so that a stop reaches
    its checkpoint within `grace` seconds (half of it for the steps before the check, the rest for the save).
    The step after an evaluation or save is always checked (check_soon). Steps that do not check read the clock
    only: no collective, no wait for the device. One process reads its flag every step. SIGHUP (the terminal
    closed, an ssh session lost) is a stop like SIGTERM: the run checkpoints, and its console output goes on
    into out_dir/console.log. SIGUSR1 is Slurm's warning before a time limit (#SBATCH --signal=...)."""

    def __init__(self, info, every=1, grace=20.0):
        self.info = info
        self.every, self.grace = every, grace
        self.received = None
        self.previous = {}
        self.delay = float(os.environ.get("GPT2_DEBUG_STEP_DELAY") or 0)
        self.next_check = 0  # the first call checks
        self.window = None  # (time, step) since which steps are timed, none across a pause
        self.paused_at, self.pauses = None, 0
        self.step_seconds = self.pause_seconds = 0.0
        self.warned = False
        # the flag travels over gloo on the CPU: agreeing on it never waits for the GPU's queue to drain
        self.group = None
        if info.ddp and info.device_type == "cuda":
            with stop_signals_blocked():  # gloo's threads keep the stop signals blocked, like the main group's
                self.group = dist.new_group(backend="gloo")
        for signum in STOP_SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:
                pass  # not the main thread: leave signals alone

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT and not self.info.ddp:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once (under torchrun a rank may see one signal twice)
        self.received = self.received or signal.Signals(signum).name

    def _time_steps(self, step, now):
        if self.window is not None and step > self.window[1]:
            self.step_seconds = (now - self.window[0]) / (step - self.window[1])

    def check_soon(self, step):
        """Before an evaluation or save at `step`: they take time, so every rank checks again at the next step."""
        now = time.time()
        self._time_steps(step, now)
        self.window, self.paused_at, self.next_check = None, now, step + 1

    def requested(self, step):
        """True on every rank when any rank got a signal; called once per step, at its start."""
        if self.delay:
            time.sleep(self.delay)
        if self.info.ddp and step < self.next_check:
            return False  # every rank skips the same steps: they still stop together
        now = time.time()
        self._time_steps(step, now)
        if self.paused_at is not None:
            if self.pauses:  # the first pause holds the warm-up (the first steps, compiling): not a measure
                self.pause_seconds = max(self.pause_seconds, now - self.paused_at)
            self.paused_at, self.pauses = None, self.pauses + 1
        self.window = (now, step)
        received, step_seconds, pause_seconds = float(self.received is not None), self.step_seconds, self.pause_seconds
        if self.info.ddp:
            device = "cpu" if self.group is not None else self.info.device
            values = torch.tensor([received, step_seconds, pause_seconds], dtype=torch.float64, device=device)
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
            received, step_seconds, pause_seconds = values.tolist()
        steps = int((self.grace - pause_seconds) / (2 * step_seconds)) if step_seconds else 1
        self.next_check = step + min(max(steps, 1), self.every)
        if not self.warned and max(step_seconds, pause_seconds) > self.grace:
            self.warned = True
            print0(f"warning: a stop signal may not reach its checkpoint within --stop_grace={self.grace:g}s: a step "
                   f"takes {step_seconds:.1f}s and the longest evaluation or checkpoint, with its step, "
                   f"{pause_seconds:.1f}s (torchrun and Slurm kill a job 30 s after SIGTERM). Give the job a longer "
                   f"grace before SIGKILL (Slurm's KillWait) and raise --stop_grace to match, or take shorter steps.")
        return bool(received)

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class NonFiniteGuard:
    """A step whose loss or gradient norm is NaN/inf skips its update; max_in_a_row of them stop the run.

    The flags are read lazily (check(), at log steps and before saves) so a GPU step needs no host sync."""

    def __init__(self, max_in_a_row, total=0):
        self.max_in_a_row = max_in_a_row
        self.total = total
        self.in_a_row = 0
        self.pending = []  # (step, finite flag, loss, grad norm) not read yet
        self.nan_steps = {int(s) for s in os.environ.get("GPT2_DEBUG_NAN_STEPS", "").split(",") if s.strip()}

    def inject(self, loss, step):
        """Test hook: a NaN loss at the steps listed in GPT2_DEBUG_NAN_STEPS."""
        return loss * float("nan") if step in self.nan_steps else loss

    def record(self, step, loss, grad_norm):
        """Keep this step's finite flag (a device tensor: no sync) for check(); returns the flag."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.pending.append((step, finite, loss, grad_norm))
        return finite

    def check(self, logger):
        """Read the flags recorded since the last check (a host sync); report each NaN/inf step, stop after
        max_in_a_row of them. True when the newest recorded step was finite."""
        finite = True
        for step, flag, loss, grad_norm in self.pending:
            finite = bool(flag)
            if finite:
                self.in_a_row = 0
                continue
            self.total += 1
            self.in_a_row += 1
            print0(f"step {step:5d} | non-finite loss {loss.item()} or grad norm {grad_norm.item()}: update "
                   f"skipped ({self.in_a_row} in a row, {self.total} in this run)")
            logger.log({"step": step, "nonfinite_steps": self.total})
            if self.in_a_row >= self.max_in_a_row:
                self.pending = []
                raise NonFiniteError(
                    f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient norm; "
                    f"stopping (max_nonfinite_steps={self.max_in_a_row}). The weights are those before step "
                    f"{step - self.in_a_row + 1}; lower --learning_rate or check the data, then --resume=auto."
                )
        self.pending = []
        return finite


def skips_on_device(optimizer):
    """True when the optimizer can skip a non-finite update itself (fused AdamW's found_inf)."""
    return type(optimizer) is torch.optim.AdamW and optimizer.defaults.get("fused")


def apply_update(optimizers, finite):
    """Step the optimizers unless this step's loss or gradient norm is NaN/inf (`finite`, a device bool)."""
    finite_on_host = None
    for optimizer in optimizers:
        if skips_on_device(optimizer):
            optimizer.found_inf = (~finite).float()  # 1.0: the kernel leaves weights, moments and step count alone
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            continue
        if finite_on_host is None:
            finite_on_host = bool(finite)  # one host sync, the same answer on every rank (loss and norm are reduced)
        if finite_on_host:
            optimizer.step()
