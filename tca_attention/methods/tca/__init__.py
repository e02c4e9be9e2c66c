"""TCA-Attention (arXiv 2512.09238) on the shared engine: config and presets (config.py), the
candidate ladder (candidates.py), calibration into per-head budgets (calibration.py, budgets.py,
budget_cache.py), Phase 2 selection math (selection.py), its reference and dispatch (select.py)
and fused kernel (triton_select.py), and the method itself (method.py)."""
