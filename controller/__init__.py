"""Control plane: turns HolySheepConfig CRs into Istio objects and a data-plane ConfigMap."""
