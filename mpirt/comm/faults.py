"""Deterministic fault injection: ``--inject-fault SPEC`` (repeatable) and ``MPIRT_FAULTS``.

SPEC is ``ACTION:key=value:...``:
  kill:member=M:step=S       SIGKILL itself when S units are committed
  hang:member=M:step=S       SIGSTOP itself (the failure detector must notice)
  leave:member=M:step=S      SIGTERM itself (graceful leave)
  stop:member=M:step=S       SIGUSR1 itself (the whole job stops, state saved: Slurm's --signal)
  raise:member=M:step=S      raise an unexpected Python exception (a bug in the job)
  host-crash:member=M:step=S   SIGKILL every process of its (simulated) host at once
  host-freeze:member=M:step=S  SIGSTOP every process of its host
  host-cut:member=M:step=S     take its host's links down (a partition)
  join:count=C:step=S        the coordinator spawns C new ranks
  ...:shard=K                instead of step: when the member takes shard K
  ...:phase=commit           after the result is written, before it is committed
  ...:phase=eval             train: in the evaluation after step S (every rank evaluates)
  ...:phase=save             train, coordinator: in the checkpoint writer (the background thread,
                             or the training thread with --checkpoint-sync) of the first save at a
                             step >= S, once the file is whole and fsynced, just before its rename
  ...:run=R                  only in run R of a job run again (Slurm requeue, restart mode: MPIRT_RUN)
``member=coordinator`` means whoever coordinates at that moment.
"""

import os
import signal
from dataclasses import dataclass

from mpirt.comm import hostfaults
from mpirt.config import FAULTS, RUN
from mpirt.errors import UsageError

# What a member does to itself (SELF) or to its host, and what the coordinator does (join).
SELF = ("kill", "hang", "leave", "stop", "raise") + hostfaults.ACTIONS
ACTIONS = SELF + ("join",)
PHASES = ("take", "commit", "eval", "save")
SIGNALS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "leave": signal.SIGTERM, "stop": signal.SIGUSR1}


@dataclass(frozen=True)
class Fault:
    index: int  # position in the plan: names the fault in the events log ("fired" once)
    action: str
    member: object = None  # int member id, "coordinator", or None (join)
    step: int = None
    shard: int = None
    count: int = 1
    phase: str = "take"
    run: int = None  # only in this run of a job that is run again (None: every run)

    def __str__(self):
        parts = [self.action]
        for key in ("member", "count", "step", "shard"):
            value = getattr(self, key)
            if value is not None and not (key == "count" and self.action != "join"):
                parts.append(f"{key}={value}")
        if self.phase != "take":
            parts.append(f"phase={self.phase}")
        if self.run is not None:
            parts.append(f"run={self.run}")
        return ":".join(parts)


def parse(spec, index=0):
    """Parse one SPEC; raise UsageError naming what is wrong."""
    fields = spec.strip().split(":")
    action = fields[0]
    if action not in ACTIONS:
        raise UsageError(f"fault '{spec}': action must be one of {', '.join(ACTIONS)}")
    kv = {}
    for item in fields[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in ("member", "step", "shard", "count", "phase", "run"):
            raise UsageError(f"fault '{spec}': '{item}' is not member=, step=, shard=, count=, phase= or run=")
        kv[key] = value
    try:
        member = kv.get("member")
        if member is not None and member != "coordinator":
            member = int(member)
        fault = Fault(
            index=index, action=action, member=member,
            step=int(kv["step"]) if "step" in kv else None,
            shard=int(kv["shard"]) if "shard" in kv else None,
            count=int(kv.get("count", 1)), phase=kv.get("phase", "take"),
            run=int(kv["run"]) if "run" in kv else None,
        )
    except ValueError:
        raise UsageError(f"fault '{spec}': member, step, shard, count and run take integers") from None
    if (fault.step is None) == (fault.shard is None):
        raise UsageError(f"fault '{spec}': give exactly one trigger, step= or shard=")
    if action == "join":
        if fault.member is not None or fault.count < 1:
            raise UsageError(f"fault '{spec}': join takes count=C (>= 1) and no member")
    elif fault.member is None:
        raise UsageError(f"fault '{spec}': {action} needs member=M or member=coordinator")
    if fault.phase not in PHASES:
        raise UsageError(f"fault '{spec}': phase is 'take', 'commit', 'eval' or 'save'")
    if fault.phase == "save" and fault.step is None:
        raise UsageError(f"fault '{spec}': phase=save takes step= (the checkpoint's step)")
    return fault


class FaultPlan:
    """The faults of a run, from the CLI specs plus ``MPIRT_FAULTS`` (';'-separated)."""

    def __init__(self, specs=(), environ=None):
        env = os.environ if environ is None else environ
        all_specs = list(specs) + [s for s in env.get(FAULTS, "").split(";") if s.strip()]
        run = int(env.get(RUN) or 1)
        self.faults = [f for f in (parse(s, i) for i, s in enumerate(all_specs)) if f.run in (None, run)]
        self.fired = set()


    def check_host_faults(self):
        """Refuse host faults outside a simulated host (called by every rank once it is in the job)."""
        host = [f for f in self.faults if f.action in hostfaults.ACTIONS]
        if host and not hostfaults.on_simulated_host():
            raise UsageError(hostfaults.refusal(host[0].action))

    def __bool__(self):
        return bool(self.faults)

    def due(self, *, member, is_coordinator, step=None, shard=None, phase="take", actions=ACTIONS):
        """The faults that fire now for this member (each fires once)."""
        hits = []
        for f in self.faults:
            if f.index in self.fired or f.action not in actions or f.phase != phase:
                continue
            if f.action == "join":
                if not is_coordinator:
                    continue
            elif not (f.member == member or (f.member == "coordinator" and is_coordinator)):
                continue
            if f.step is not None and step is not None and step >= f.step:
                hits.append(f)
            elif f.shard is not None and shard is not None and shard == f.shard:
                hits.append(f)
        return hits


def strike(fault):
    """Do a kill/hang/leave/stop fault to this very process, or a host fault to its host."""
    if fault.action in hostfaults.ACTIONS:
        hostfaults.strike(fault.action)
        return
    if fault.action == "raise":
        raise RuntimeError(f"injected fault {fault}")
    os.kill(os.getpid(), SIGNALS[fault.action])
