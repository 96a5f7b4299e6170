"""The decision threshold's order, one rule for every scorer (the torch model, the exported graph) and every front
end (kano predict, kano serve, kano.Detector): the one given (command line or API argument) > a calibration's >
the one the model carries (a run's own, or the one exported with a graph) > none.

Values only: finding the calibration or the run's threshold is the caller's (evaluator.detector reads a run's
calibration.json, deploy.runtime its sidecar); this module imports no other Kano package.
"""

from __future__ import annotations

from kano.core.errors import KanoError

SOURCES = ("command line", "calibration", "run")  # where a threshold came from, as results record it


def check_given(given: float | None, name: str = "threshold") -> float | None:
    """`given` as a float when it is a number in [0, 1] (scores are in [0, 1]); None stays None."""
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not 0.0 <= given <= 1.0:
        raise KanoError(f"{name} must be a number in [0, 1] (scores are in [0, 1]), got {given}")
    return float(given)


def pick(given: float | None, calibrated: float | None = None, carried: float | None = None,
         carried_source: str | None = "run") -> tuple[float | None, str | None]:
    """-> (threshold, source) by the module docstring's order. carried_source: how the model's own threshold is
    recorded ("run" for a run's; an exported graph's says where it came from and that it was exported)."""
    if given is not None:
        return check_given(given), "command line"
    if calibrated is not None:
        return float(calibrated), "calibration"
    if carried is not None:
        return float(carried), carried_source
    return None, None
