"""Time-series domain tests: Seg-MoE, moe_patchtst, data protocol, forecasting task."""
