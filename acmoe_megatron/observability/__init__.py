"""Routing metrics, TensorBoard/W&B writers, figures, the router-loss tracker, run summary and sample trace."""
