"""Kano's Python API: a detector you load once and call on images.

    import kano
    det = kano.Detector.load("runs/x")                                   # a trained run
    res = det("photo.png", class_name="hazelnut")                        # one image -> Result
    res.score, res.map.shape, res.anomalous, res.threshold, res.threshold_source, res.class_word

    det = kano.Detector.zero_shot(method="winclip", backbone="micro",   # no training: WinCLIP+ with
                                  references="good_photos/", k_shot=4)   # 4 of your normal photos
    results = det(["a.png", "b.png"], class_name="hazelnut")             # a batch -> list[Result]

`kano predict` builds the same object (`Detector.load` / `Detector.zero_shot`) and asks it for the class
word and the threshold of each class, so the command line and this API decide alike.

Thresholds, first match wins: the one given (`threshold=`, `kano predict --threshold`; source "command
line") > the calibration's image threshold for the class (`calibration=FILE`, else RUN/calibration.json;
`kano calibrate`; source "calibration") > the run's own, calibrated on its auxiliary data at training, for
the run scored as it is (source "run") > none (scores only). A calibration is keyed by the scoring mode it was
made for (evaluator.calibrate.scoring_mode); one of another mode (few-shot references, K, backbone, weights,
class word) is refused, naming the field that differs. The calibration's pixel threshold sets the scale the
maps are drawn on (`pixel_threshold_for`).

    det = kano.Detector.zero_shot(method="median_colour", calibration="floor_cal.json")
"""

from kano.evaluator.detector import (  # noqa: F401  (the public names; the code lives in the evaluator)
    THRESHOLD_SOURCES, Detector, ImageInput, Result, resolve_threshold, weights_sha256)

__all__ = ["Detector", "Result", "resolve_threshold", "weights_sha256", "THRESHOLD_SOURCES", "ImageInput"]
