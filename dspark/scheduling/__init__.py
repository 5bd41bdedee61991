"""Confidence-scheduled verification (DSpark, §3.2): how many drafts of each request to verify.

* :mod:`~dspark.scheduling.prefix` — survivals and the threshold / hardware-aware / top-k prefix rules;
* :mod:`~dspark.scheduling.profile` — the target's measured cost curve SPS(B);
* :mod:`~dspark.scheduling.calibration` — Sequential Temperature and Platt scaling, and their metrics;
* :mod:`~dspark.scheduling.skipping` — whether a round drafts at all (idle backoff, measured fallback);
* :mod:`~dspark.scheduling.schedulers` — the ``scheduler`` config section's components.
"""

from dspark.scheduling.calibration import (apply_temperatures, auroc, brier_score, calibration_report,
                                           expected_calibration_error, fit_platt, fit_sts)
from dspark.scheduling.prefix import survival, threshold_lengths, throughput_lengths, top_k_lengths
from dspark.scheduling.profile import ThroughputProfile, profile_target
from dspark.scheduling.schedulers import (SCHEDULERS, AdaptiveScheduler, AsyncDSparkScheduler, DSparkScheduler,
                                          FixedScheduler, Scheduler, SchedulerConfig, ThresholdScheduler,
                                          register_scheduler)
from dspark.scheduling.skipping import IdleBackoff, MeasuredFallback

__all__ = ["SCHEDULERS", "AdaptiveScheduler", "AsyncDSparkScheduler", "DSparkScheduler", "FixedScheduler",
           "IdleBackoff", "MeasuredFallback", "Scheduler", "SchedulerConfig", "ThresholdScheduler",
           "ThroughputProfile", "register_scheduler", "apply_temperatures", "auroc", "brier_score",
           "calibration_report", "expected_calibration_error", "fit_platt", "fit_sts", "profile_target", "survival",
           "threshold_lengths", "throughput_lengths", "top_k_lengths"]
