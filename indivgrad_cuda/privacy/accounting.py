"""Privacy accounting: the history of (noise multiplier, sample rate, steps) the DP-SGD step
keeps, turned into epsilon by Opacus's accountants (an optional dependency)."""

ACCOUNTANTS = ("prv", "rdp", "gdp")  # Opacus's names; "prv" is its make_private default


def record_step(history: list, noise_multiplier: float, sample_rate: float) -> None:
    """Appends one step to ``history``, merging it into the last entry when the noise and
    the sample rate are unchanged (Opacus's accountants keep the same form)."""
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        history[-1] = (noise_multiplier, sample_rate, history[-1][2] + 1)
    else:
        history.append((noise_multiplier, sample_rate, 1))


def epsilon(history: list, delta: float, accountant: str = "prv") -> float:
    """Epsilon of (epsilon, delta)-DP after the steps in ``history``
    (``[(noise_multiplier, sample_rate, steps), ...]``) by Opacus's ``accountant``; 0 for no steps."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {ACCOUNTANTS}, got {accountant!r}")
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise ValueError(f"delta: expected a float in (0, 1), got {delta!r}")
    if not history:
        return 0.0
    if accountant == "gdp" and len(history) > 1:  # Opacus's would silently account the last entry alone
        raise ValueError(
            f"accountant: 'gdp' needs one noise multiplier and sample rate throughout, the history has "
            f"{len(history)} ({history}); use 'prv' or 'rdp'"
        )
    try:
        from opacus.accountants import create_accountant
    except ImportError as e:
        raise ImportError(
            "privacy accounting uses Opacus's accountants, and opacus is not installed: "
            "pip install 'indivgrad_cuda[opacus]' (or opacus>=1.5)"
        ) from e
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))
