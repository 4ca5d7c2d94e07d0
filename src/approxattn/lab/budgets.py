"""Budgets: the options that trade accuracy for cost, and the values the lab sweeps.

Which options are budgets is data (``BUDGET_OPTIONS``), read against each method's registered
options: a method with several budget options (FLuRKA: rank r and features m) sweeps them
together, level by level; a method with none is run once with its defaults.
"""

from __future__ import annotations

from typing import Any

from approxattn import MethodSpec, get_method

# option name -> (short label, default sweep, quick sweep)
BUDGET_OPTIONS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "num_features": ("m", (16, 64, 256), (16, 128)),
    "rank": ("r", (32, 64, 128), (32, 128)),
    "num_landmarks": ("landmarks", (16, 32, 64), (16, 64)),
    "landmarks": ("landmarks", (16, 32, 64), (16, 64)),
    "num_samples": ("samples", (16, 32, 64), (16, 64)),
    "k": ("k", (16, 32, 64), (16, 64)),          # SEA: keys per row
    "top_k": ("k", (16, 32, 64), (16, 64)),
    "topk": ("k", (16, 32, 64), (16, 64)),
    "window": ("w", (32, 64, 128), (32, 128)),
    "window_size": ("w", (32, 64, 128), (32, 128)),
    "block_size": ("block", (16, 32, 64), (16, 64)),
    "num_blocks": ("blocks", (2, 4, 8), (2, 8)),
    "num_clusters": ("clusters", (8, 16, 32), (8, 32)),
    "num_buckets": ("buckets", (8, 16, 32), (8, 32)),
}


def budget_option_names(spec: MethodSpec) -> list[str]:
    """The budget options ``spec`` has, in its registration order."""
    return [o.name for o in spec.options if o.name in BUDGET_OPTIONS]


def budget_label(budget: dict[str, Any]) -> str:
    if not budget:
        return "-"
    return " ".join(f"{BUDGET_OPTIONS.get(name, (name,))[0]}={value}" for name, value in budget.items())


def parse_value(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_budget_overrides(items: list[str] | None, methods: list[str]) -> dict[tuple[str | None, str], list[Any]]:
    """``["performer.num_features=16,64", "rank=32,64"]`` → ``{(method|None, option): values}``.

    Raises ``ValueError`` with a clear message for an unknown method or option, a value the
    option rejects, or a global option no selected method has.
    """
    overrides: dict[tuple[str | None, str], list[Any]] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--budget {item!r}: expected METHOD.OPTION=V1,V2,... or OPTION=V1,V2,...")
        target, values_text = item.split("=", 1)
        method, _, option = target.rpartition(".")
        values = [parse_value(v) for v in values_text.split(",") if v.strip()]
        if not option or not values:
            raise ValueError(f"--budget {item!r}: expected METHOD.OPTION=V1,V2,... or OPTION=V1,V2,...")
        if method:
            spec = get_method(method)  # unknown method: ValueError listing the available ones
            targets = [spec]
        else:
            targets = [get_method(m) for m in methods if option in get_method(m).defaults]
            if not targets:
                raise ValueError(f"--budget {item!r}: none of the selected methods has an option {option!r}")
        for spec in targets:
            if option not in spec.defaults:
                valid = ", ".join(spec.defaults) or "none"
                raise ValueError(f"--budget {item!r}: method {spec.name!r} has no option {option!r}; its options: {valid}")
            for value in values:
                try:
                    spec.resolve_options({option: value})
                except (TypeError, ValueError) as err:
                    raise ValueError(f"--budget {item!r}: impossible budget: {err}") from None
        overrides[(method or None, option)] = values
    return overrides


def method_budgets(
    spec: MethodSpec, *, quick: bool = False, overrides: dict[tuple[str | None, str], list[Any]] | None = None
) -> list[dict[str, Any]]:
    """The budgets (option dicts) ``spec`` is swept over; ``[{}]`` for a method without budget options.

    Overridden options (``--budget``) are swept even when they are not in ``BUDGET_OPTIONS``.
    """
    overrides = overrides or {}
    names = budget_option_names(spec)
    names += [name for (method, name) in overrides if method == spec.name and name not in names]
    values: dict[str, list[Any]] = {}
    for name in names:
        given = overrides.get((spec.name, name), overrides.get((None, name)))
        if given is not None:
            values[name] = list(given)
        else:
            default = BUDGET_OPTIONS[name][2 if quick else 1]
            option = next(o for o in spec.options if o.name == name)
            values[name] = [v for v in default if option.type_ok(v) and option.check(v)] or [option.default]
    if not values:
        return [{}]
    levels = max(len(v) for v in values.values())
    for name, vals in values.items():
        if len(vals) not in (1, levels):
            raise ValueError(
                f"--budget: method {spec.name!r} sweeps its budget options together, level by level; "
                f"{name!r} has {len(vals)} values where another has {levels} (give 1 or {levels})"
            )
    return [{name: vals[i] if len(vals) > 1 else vals[0] for name, vals in values.items()} for i in range(levels)]
