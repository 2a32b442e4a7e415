"""The audit's recommendations, in the server's units: ``--quota-samples``, ``--quota-grad-rows`` and edits.

The rule per attack (issue 13): stay 10x below the point at which the surrogate's linear probe reaches
90 % of the backbone's. Checkpoints are log-spaced, so the crossing lies between the last checkpoint
below 90 % and the first at or above it; the quota is a tenth of the *last checkpoint below*, in each of
calls, samples, gradient rows and edit rows, which keeps it at least 10x below the crossing. An attack
that stays below 90 % within the budget gets a tenth of its last checkpoint (safe, and a larger budget
may allow more).

Per level (``combine``): a client at a level can run every attack of the levels below it, so
``--quota-samples`` is the lowest among the attacks up to the level; ``--quota-grad-rows`` comes from the
gradient attacks only (a sample quota already bounds forward-only attacks), and exists from dark-gray up:
at black-box the level itself refuses gradients. No recommended value forbids a level's own operation:
never 0 (which graytune serve reads as *no limit*), and never below one call's rows (a server refuses a
request that would pass a budget, so a quota of 1 row forbids every 16-row forward or VJP); where the rule
gives less, the recommendation is one call's rows and a note says that no quota of that kind protects the
level at this batch. Edits at the token embeddings without gradients are a black-box capability
(``--black-box-edits``): the recommendation names what the finite-difference attacks got from them. Each
level's ``why`` is one line: what the level sells, what its attacks reached, and where its quota comes from
beside the level below's.

Example:
    >>> combine(levels, rows_per_call=16)          # adds levels[name]["recommended_quota"]
    >>> levels["dark-gray"]["recommended_quota"]["flags"]
    {'--quota-samples': 800, '--quota-grad-rows': 320, '--black-box-edits': None}
"""

from __future__ import annotations

from typing import Any

from graytune.types import AccessLevel

THRESHOLD = 0.9  # of the backbone's probe accuracy
MARGIN = 10  # how far below the crossing the quota stays
KEYS = ("calls", "samples", "grad_rows", "edit_rows")
GRADIENT_MODES = ("vjp",)
PAST = {"refuse": "refused", "count": "counted", "allow": "allowed"}  # --black-box-edits, as the why line says it


def recommend(checkpoints: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """The quota for one extraction curve (see the module docstring)."""
    hit = next((i for i, c in enumerate(checkpoints) if c["probe_ratio"] >= THRESHOLD), None)
    best = max(checkpoints, key=lambda c: c["probe_ratio"])
    if hit == 0:
        return {"reached": True, "calls_to_90": 0, "quota": "not measurable",
                "note": ("the untrained surrogate's random features already reach the threshold: the probe task is "
                         "too easy to tell extraction apart; pick a harder --data")}
    before = checkpoints[-1] if hit is None else checkpoints[hit - 1]
    quota = {key: before.get(key, 0) // MARGIN for key in KEYS}
    if hit is None:
        return {"reached": False, "quota": quota, "best_probe_ratio": best["probe_ratio"],
                "best_at_calls": best["calls"],
                "note": (f"the surrogate stayed below {THRESHOLD:.0%} of the backbone's probe accuracy in "
                         f"{before['calls']:,} calls; the quota is a tenth of that (safe); run a larger --budget "
                         "to find the crossing")}
    at = checkpoints[hit]
    untrained = checkpoints[0]["probe_ratio"] if checkpoints[0]["calls"] == 0 else None
    result = {"reached": True, "calls_to_90": {"more_than": before["calls"], "at_most": at["calls"]},
              "quota": quota,
              "rule": (f"a tenth of {before['calls']:,} calls, the last checkpoint below {THRESHOLD:.0%} of the "
                       "backbone's probe accuracy (so at least 10x below the crossing)")}
    if untrained is not None and untrained >= THRESHOLD - 0.1:
        result["note"] = (f"the untrained surrogate's random features already reach {untrained:.0%} of the "
                          "backbone's probe accuracy: the crossing says little about extraction on this task; read "
                          "the cosine and explained-variance curves too, or pick a harder --data")
    return result


def combine(levels: dict[str, dict[str, Any]], rows_per_call: int = 1) -> None:
    """Give each level its recommendation (``recommended_quota``) from the attacks up to it.

    Args:
        levels: the audit's findings per level name (``extraction``, ``extraction_quota``, the Jacobian attacks).
        rows_per_call: the rows of one attack call: the least quota that lets one call of a level's own
            operation (a forward, a VJP, an edited forward) through.
    """
    ordered = sorted(levels, key=lambda name: AccessLevel.parse(name))
    below: tuple[str, dict[str, Any]] | None = None
    for i, name in enumerate(ordered):
        available = [(lower, mode, found) for lower in ordered[:i + 1]
                     for mode, found in levels[lower].get("extraction_quota", {}).items()]
        quota = _recommendation(name, available, levels, max(1, rows_per_call))
        quota["why"] = why(name, levels, quota, below)
        levels[name]["recommended_quota"] = quota
        below = (name, quota)


Available = list[tuple[str, str, dict[str, Any]]]  # (level, attack mode, recommend() of its curve)


def _recommendation(name: str, available: Available, levels: dict[str, dict[str, Any]],
                    floor: int) -> dict[str, Any]:
    level = AccessLevel.parse(name)
    samples = _lowest(available, "samples", floor)
    calls = _lowest(available, "calls", 1)
    if level < AccessLevel.DARK_GRAY:
        grad = {"value": None, "note": "a black-box key gets no gradient (the level refuses VJPs), so "
                                       "--quota-grad-rows does not apply; never set it to 0, which means no limit"}
    else:
        grad = _lowest([a for a in available if a[1] in GRADIENT_MODES], "grad_rows", floor)
    edits = _edits(name, levels, floor)
    flags = {"--quota-samples": samples["value"], "--quota-grad-rows": grad["value"],
             "--black-box-edits": edits.get("policy")}
    return {"flags": flags, "calls": calls, "samples": samples, "grad_rows": grad, "edits": edits}


def _lowest(available: Available, key: str, floor: int) -> dict[str, Any]:
    """The lowest ``key`` quota among the measurable attacks, never below ``floor`` (one call's rows): a server
    reads 0 as no limit and refuses a request that would pass a budget, so less forbids the level's own calls."""
    measured = [(found["quota"][key], lower, mode) for lower, mode, found in available
                if isinstance(found.get("quota"), dict)]
    if not measured:
        return {"value": None, "note": "not measurable on this probe task: no attack's curve gives a quota; size it "
                                       "from the deployment's needs"}
    value, lower, mode = min(measured)
    out: dict[str, Any] = {"value": max(floor, value), "from": f"{lower} {mode}"}
    if value < floor:
        unit = "call" if key == "calls" else f"call's {floor:,} rows"
        out["note"] = (f"the rule gives {value:,} (the {lower} {mode} attack crossed 90 % within its first "
                       f"checkpoints): no {key.replace('_', ' ')} quota protects this level at this batch size; "
                       f"{max(floor, value):,} is one {unit}, the least that lets the level's own operation through "
                       "(0 means no limit to a server)")
    return out


def _edits(name: str, levels: dict[str, dict[str, Any]], floor: int = 1) -> dict[str, Any]:
    """What edits without gradients gave the black-box attacks, and the policy that follows."""
    if AccessLevel.parse(name) >= AccessLevel.DARK_GRAY:
        return {"policy": None, "note": "edits with gradients are this level's own operation"}
    found = levels[name]
    jacobian = found.get("finite_differences", {})
    if jacobian.get("status") in (None, "not applicable") or "no gradient asked" not in jacobian.get("edits", ""):
        return {"policy": None, "note": jacobian.get("reason", "no edit at an input port was needed: the pixels are "
                                                              "the raw input, which any black-box API serves")}
    quota = found.get("extraction_quota", {}).get("differences", {}).get("quota")
    rows = quota["edit_rows"] if isinstance(quota, dict) else None
    return {"policy": "refuse", "for_zeroth_order_keys": "count",
            "edit_rows": max(floor, rows) if rows is not None else None,
            "full_jacobian": {k: jacobian.get(k) for k in ("status", "relative_error")} | {
                "edit_rows": jacobian["spent"]["edit_rows"], "calls": jacobian["spent"]["calls"]},
            "note": ("edits at the token embeddings without gradients give Jacobian columns by finite differences: "
                     "refuse them on a server whose keys do not train zeroth-order input adapters; count them where "
                     "one does (dga-zo, prompt-zo), bound their rows with --quota-samples (every edited row is a "
                     "sample) and watch black_box_edit_rows on /v1/stats against edit_rows")}


def why(name: str, levels: dict[str, dict[str, Any]], quota: dict[str, Any] | None = None,
        below: tuple[str, dict[str, Any]] | None = None) -> str:
    """One line: what this level sells, what its attacks got, and where its quota comes from beside ``below``'s."""
    found = levels[name]
    parts = [f"{mode}: {_crossing(found['extraction'][mode], found['extraction_quota'][mode])}"
             for mode in found.get("extraction", {})]
    level = AccessLevel.parse(name)
    jacobian = found.get("finite_differences", {})
    if jacobian.get("status") in ("recovered", "partial"):
        error = f", error {jacobian['relative_error']:.1e} against the VJP" if "relative_error" in jacobian else ""
        whole = "a full Jacobian" if jacobian["status"] == "recovered" else \
            f"{jacobian['columns']:,} of {jacobian['columns_needed']:,} Jacobian columns"
        parts.append(f"{whole} at one input by finite differences in {jacobian['spent']['calls']} calls, "
                     f"{jacobian['spent']['samples']:,} samples and no gradient{error}")
    dup = found.get("duplicate_rows", {})
    if dup.get("status") == "recovered":
        parts.append(f"a full Jacobian by duplicate rows in {dup['spent']['calls']} calls")
    what = {AccessLevel.BLACK_BOX: "outputs, and edits without gradients at the input port",
            AccessLevel.DARK_GRAY: "exact VJPs at the input port (per token or pixel) on top of what black-box gives",
            AccessLevel.LIGHT_GRAY: "gradients at entry ports too (this audit's attacks use the input port's only, "
                                    "so its curves are dark-gray's)"}[level]
    line = f"{name} sells {what}; " + "; ".join(parts)
    return line + (f"; so {_quota_reason(quota, below)}" if quota else "")


def _quota_reason(quota: dict[str, Any], below: tuple[str, dict[str, Any]] | None) -> str:
    """Where the level's flags come from, and how they differ from the level below's."""
    samples, grad = quota["samples"], quota["grad_rows"]
    if samples["value"] is None:
        reason = "--quota-samples is not measurable here"
    else:
        reason = f"--quota-samples {samples['value']:,} (from {samples['from']}"
        if below is not None and below[1]["samples"]["value"] is not None:
            lower, previous = below[0], below[1]["samples"]["value"]
            if samples["value"] < previous:
                reason += f"; {lower}'s is {previous:,}: this level's attack reached 90 % on fewer samples"
            elif samples["from"].startswith(lower) or samples["value"] == previous:
                reason += f", as at {lower}: this level's own attacks extract no more per sample"
        reason += ")"
    if grad["value"] is not None:
        reason += (f" and --quota-grad-rows {grad['value']:,} (from {grad['from']}; gradients are this level's own "
                   "operation)")
    edits = quota["edits"]
    if edits.get("policy"):
        reason += (f", edits without gradients {PAST[edits['policy']]} ({PAST[edits['for_zeroth_order_keys']]} on a "
                   "server whose keys train zeroth-order input adapters)")
    return reason


def _crossing(extraction: dict[str, Any], quota: dict[str, Any]) -> str:
    if quota.get("quota") == "not measurable":
        return "not measurable (the untrained surrogate is already at 90 %)"
    if not quota.get("reached"):
        last = extraction["checkpoints"][-1]
        return f"below 90 % after {last['calls']:,} calls (best ratio {quota['best_probe_ratio']:.2f})"
    crossing = quota["calls_to_90"]
    at = next(c for c in extraction["checkpoints"] if c["calls"] == crossing["at_most"])
    units = [f"{at['samples']:,} samples"] + [f"{at[k]:,} {k.replace('_', ' ')}" for k in ("grad_rows", "edit_rows")
                                              if at.get(k)]
    return f"90 % within {crossing['at_most']:,} calls ({', '.join(units)})"
