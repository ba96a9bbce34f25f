"""What operators see: Prometheus metrics, OpenTelemetry traces, exemplars and logs."""
