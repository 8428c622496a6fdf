"""Reading values (not just names) out of a Prometheus text exposition, for the e2e tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` (the full sample name, e.g. ``holysheep_tokens_total``)."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (0 when none)."""
    return sum(v for got, v in samples(text, name) if all(got.get(k) == want for k, want in labels.items()))


def label_values(text: str, name: str, label: str) -> set[str]:
    return {got[label] for got, _ in samples(text, name) if label in got}
