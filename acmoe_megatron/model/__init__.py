"""The megatron boundary of the model: routers, spec patch, per-chunk state, label transport, elliptical attention, expert norm, precision rules, model checks."""
