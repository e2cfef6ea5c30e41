"""DynamicLossScaler on its own: backoff on overflow, growth after a clean interval, a static scale, state."""

from mllm_cl.precision import DynamicLossScaler


def _updates(scaler: DynamicLossScaler, finite: str) -> list[float]:
    """The scale after each update, for steps written as "+" (finite) and "x" (inf/nan)."""
    scales = []
    for step in finite:
        scaler.update(step == "+")
        scales.append(scaler.scale)
    return scales


def test_an_overflow_skips_backs_off_and_restarts_the_clean_count() -> None:
    scaler = DynamicLossScaler(scale=1024.0, growth_interval=3)
    assert _updates(scaler, "++x") == [1024.0, 1024.0, 512.0]
    assert scaler.skipped_steps == 1 and scaler.clean_steps == 0
    assert _updates(scaler, "xx") == [256.0, 128.0]
    assert scaler.skipped_steps == 3


def test_the_scale_grows_after_growth_interval_clean_steps() -> None:
    scaler = DynamicLossScaler(scale=8.0, growth_interval=3)
    assert _updates(scaler, "+++") == [8.0, 8.0, 16.0]
    assert scaler.clean_steps == 0
    # two clean steps, an overflow (8), then the count starts again: three more clean steps to grow
    assert _updates(scaler, "++x+++") == [16.0, 16.0, 8.0, 8.0, 8.0, 16.0]
    assert scaler.skipped_steps == 1


def test_growth_and_backoff_factors() -> None:
    scaler = DynamicLossScaler(scale=64.0, growth_interval=2, growth_factor=4.0, backoff_factor=0.25)
    assert _updates(scaler, "++x") == [64.0, 256.0, 64.0]


def test_a_static_scale_never_changes_but_counts_skips() -> None:
    scaler = DynamicLossScaler(scale=1024.0, dynamic=False, growth_interval=1)
    assert _updates(scaler, "+++xx+") == [1024.0] * 6
    assert scaler.skipped_steps == 2 and scaler.clean_steps == 1


def test_state_round_trip() -> None:
    scaler = DynamicLossScaler(scale=2.0 ** 16, growth_interval=3)
    _updates(scaler, "x++")
    state = scaler.state_dict()
    assert state == {"dynamic": True, "scale": 2.0 ** 15, "growth_interval": 3, "clean_steps": 2,
                     "skipped_steps": 1}
    other = DynamicLossScaler(growth_interval=3)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert _updates(other, "+") == _updates(scaler, "+") == [2.0 ** 16]  # the clean count carried over too
