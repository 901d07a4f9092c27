"""What each key is updated with: Thinc's defaults and ranges (`defaults`), values and
schedules at a step (`hyperparameters`), per-parameter groups (`groups`), the settings
per tensor and the non-finite mode (`per_tensor`), parameter paths (`naming`)."""
