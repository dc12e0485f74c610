"""A deterministic synthetic catalogue for the demo and the tests (stands in for METHOD.md 1.1 output).

Items get real-looking titles and descriptions built from per-category vocabularies (brands,
adjectives, materials, nouns, sizes, uses), so text embeddings cluster by the latent category, which
is stored in ``items.parquet`` as ``category``. User sequences carry learnable structure:

- the category follows a Markov chain: stay with probability ``stay_prob``, else jump to another;
- inside a category, half of the steps follow a fixed item-to-item successor (a "refill" of the last
  item), the others draw from a Zipf popularity over the category's items;
- timestamps increase within a user (gaps of hours to weeks), users start at different times.

Samples and the split go through the same code as ``amazon2018`` (:mod:`tsrec.data.samples`).
Everything derives from ``run.seed`` and ``data.synthetic``. Command: ``tsrec data prepare --source
synthetic --out DIR`` (default size: 400 items, 600 users, well under a second).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tsrec.config import ConfigError, DataConfig
from tsrec.data.samples import SourceData, make_samples, split_samples

# name, brands, adjectives, materials, nouns, sizes, packs, uses
VOCAB = [
    ("Fasteners", ["Stanley", "Arrow", "Hillman", "Bostitch"], ["Heavy-Duty", "Galvanized", "Rust-Resistant", "Narrow Crown"],
     ["Steel", "Stainless Steel", "Zinc-Plated"], ["Staples", "Brad Nails", "Wood Screws", "Hex Bolts"],
     ["1/2-Inch", "3/8-Inch", "1-1/4-Inch", "#8 x 1-Inch"], ["100 Count", "500 Count", "1000 Count"], ["upholstery", "roofing felt", "cabinet assembly", "framing"]),
    ("Adhesives", ["Gorilla", "Loctite", "J-B Weld", "3M"], ["Waterproof", "Fast-Setting", "Clear", "Industrial Strength"],
     ["Epoxy", "Polyurethane", "Cyanoacrylate"], ["Glue", "Super Glue Gel", "Sealant", "Construction Adhesive"],
     ["8 Ounce", "2 Ounce", "20 Gram", "10 Fluid Ounce"], ["Pack of 1", "Pack of 2", "Pack of 4"], ["wood repair", "ceramics", "metal bonding", "household fixes"]),
    ("Tape", ["Scotch", "Duck", "Gorilla", "Nashua"], ["Black", "Double-Sided", "Heat-Resistant", "Weatherproof"],
     ["Vinyl", "Kapton", "Aluminum Foil"], ["Duct Tape", "Electrical Tape", "Masking Tape", "Mounting Tape"],
     ['1.88" x 35 yd', '3/4" x 60 ft', '2" x 50 yd', '1" x 36 yd'], ["Pack of 1", "Pack of 3", "6 Rolls"], ["HVAC ducts", "wire insulation", "painting", "packaging"]),
    ("3D Printing", ["HATCHBOX", "Overture", "SUNLU", "Creality"], ["Tangle-Free", "Dimensional Accuracy +/- 0.03 mm", "Matte", "High-Speed"],
     ["PLA", "PETG", "TPU"], ["Filament", "Build Plate", "Nozzle Kit", "Spool Holder"],
     ["1.75 mm", "2.85 mm", "1 kg Spool", "235 x 235 mm"], ["1 Pack", "2 Pack", "10 Pieces"], ["FDM printers", "prototyping", "cosplay props", "classroom projects"]),
    ("Lab Supplies", ["Eisco", "Karter Scientific", "Pyrex", "Thermo Scientific"], ["Borosilicate", "Graduated", "Autoclavable", "Sterile"],
     ["Glass", "Polypropylene", "Nitrile"], ["Beaker", "Test Tubes", "Pipettes", "Gloves"],
     ["250 ml", "16 x 150 mm", "3 ml", "Medium"], ["Set of 6", "Pack of 100", "Box of 50"], ["chemistry labs", "sample storage", "titration", "biology classes"]),
    ("Test Meters", ["Fluke", "Klein Tools", "AstroAI", "Extech"], ["Digital", "Auto-Ranging", "True RMS", "Non-Contact"],
     ["CAT III", "Backlit LCD", "Rugged"], ["Multimeter", "Clamp Meter", "Voltage Tester", "Thermometer Gun"],
     ["600V", "1000V", "400A", "-50 to 550 C"], ["with Test Leads", "with Case", "Kit"], ["electricians", "automotive diagnostics", "HVAC service", "home wiring"]),
    ("Safety", ["3M", "Honeywell", "MSA", "Ergodyne"], ["Anti-Fog", "Hi-Vis", "Cut-Resistant", "Lightweight"],
     ["Polycarbonate", "Kevlar", "Foam"], ["Safety Glasses", "Work Gloves", "Earplugs", "Hard Hat"],
     ["One Size", "Large", "NRR 32 dB", "Adjustable"], ["Pack of 12", "Pair", "Box of 200"], ["construction sites", "shop work", "shooting ranges", "warehouses"]),
    ("Plumbing", ["SharkBite", "Oatey", "Fluidmaster", "Everbilt"], ["Push-to-Connect", "Lead-Free", "Universal", "Leak-Proof"],
     ["Brass", "PEX", "PVC"], ["Coupling", "Ball Valve", "Fill Valve", "Pipe Fitting"],
     ["1/2-Inch", "3/4-Inch", "1-Inch", "1/4 Turn"], ["Single", "Pack of 2", "Pack of 10"], ["toilet repair", "water lines", "irrigation", "RV plumbing"]),
    ("Abrasives", ["Dewalt", "Norton", "Diablo", "Mirka"], ["Hook and Loop", "Premium", "Long-Lasting", "Wet/Dry"],
     ["Aluminum Oxide", "Silicon Carbide", "Ceramic"], ["Sanding Discs", "Flap Wheel", "Sandpaper Sheets", "Grinding Wheel"],
     ["5-Inch", "120 Grit", "9 x 11-Inch", "4-1/2-Inch"], ["50 Pack", "25 Pack", "Assorted Grits"], ["woodworking", "auto body", "metal finishing", "drywall"]),
    ("Hydroponics", ["General Hydroponics", "VIVOSUN", "iPower", "Fox Farm"], ["pH-Balanced", "Organic", "Adjustable", "Full Spectrum"],
     ["Coco Coir", "Rockwool", "Mylar"], ["Nutrient Kit", "Grow Light", "pH Test Kit", "Grow Tent"],
     ["1 Quart", "1000W", '48" x 24" x 60"', "Gallon"], ["3 Pack", "Kit", "Single"], ["indoor gardens", "seedlings", "vegetables", "herbs"]),
]

DESCRIPTIONS = [
    "{Adj} {noun} made from {material} for {use}.",
    "Designed for {use}, this {material} {noun_l} holds up to daily use.",
    "{Brand} {noun_l} are trusted by professionals working on {use}.",
    "Pairs well with other {category_l} supplies; sold as {pack}.",
]


def generate_synthetic(cfg: DataConfig, seed: int) -> SourceData:
    """Generate the synthetic catalogue and user sequences, then build samples and the split.

    Args:
        cfg: the ``data`` section; reads ``synthetic`` (sizes, stay_prob), ``max_history``, ``split``.
        seed: ``run.seed``; the same seed and config give identical outputs.

    Returns:
        SourceData with items (item_id, title, description, brand, category) and splits.
    """
    syn = cfg.synthetic
    _validate(syn)
    rng = np.random.default_rng(seed)

    # --- catalogue: categories, titles, descriptions ---
    item_cat = rng.permutation(np.arange(syn.n_items) % syn.n_categories)  # every category gets items
    titles, descriptions, brands, seen = [], [], [], set()
    for cat in item_cat:
        title, desc, brand = _item_text(rng, int(cat), syn.n_categories)
        while title in seen:  # titles are unique, like a real catalogue after dedup
            title, desc, brand = _item_text(rng, int(cat), syn.n_categories)
        seen.add(title)
        titles.append(title)
        descriptions.append(desc)
        brands.append(brand)
    members = [np.nonzero(item_cat == c)[0] for c in range(syn.n_categories)]
    # Zipf popularity inside each category over a random rank order
    popularity = []
    for m in members:
        w = 1.0 / np.arange(1, len(m) + 1) ** 1.1
        popularity.append(rng.permutation(w) / w.sum())
    successor = {}
    for m in members:  # item -> its fixed "refill" item in the same category
        ring = rng.permutation(m)
        successor.update({int(a): int(b) for a, b in zip(ring, np.roll(ring, -1))})

    # --- users: Markov chain over categories, successor/popularity inside a category ---
    lengths = rng.integers(syn.min_seq_len, syn.max_seq_len + 1, size=syn.n_users)
    starts = rng.integers(1_475_280_000, 1_475_280_000 + 2 * 365 * 86_400, size=syn.n_users)  # from 2016-10-01
    users, items, times = [], [], []
    for u in range(syn.n_users):
        cat = int(rng.integers(syn.n_categories))
        item = int(rng.choice(members[cat], p=popularity[cat]))
        t = int(starts[u])
        for step in range(int(lengths[u])):
            if step:
                if rng.random() < syn.stay_prob:
                    item = successor[item] if rng.random() < 0.5 else int(rng.choice(members[cat], p=popularity[cat]))
                else:
                    cat = int((cat + rng.integers(1, syn.n_categories)) % syn.n_categories) if syn.n_categories > 1 else cat
                    item = int(rng.choice(members[cat], p=popularity[cat]))
                t += int(rng.integers(3_600, 30 * 86_400))
            users.append(u)
            items.append(item)
            times.append(t)

    # --- samples and split: the shared code path ---
    samples = make_samples(np.array(users), np.array(items), np.array(times), cfg.max_history)
    splits = split_samples(samples, cfg.split)
    items_table = pa.table(
        {
            "item_id": pa.array(np.arange(syn.n_items), pa.int64()),
            "title": pa.array(titles, pa.string()),
            "description": pa.array(descriptions, pa.string()),
            "brand": pa.array(brands, pa.string()),
            "category": pa.array([_category_name(int(c), syn.n_categories) for c in item_cat], pa.string()),
        }
    )
    stats = {"interactions": len(users), "categories": syn.n_categories, "skipped": {}}
    return SourceData(items_table, splits, {}, stats)


def _validate(syn) -> None:
    if syn.n_items < syn.n_categories or syn.n_categories < 1:
        raise ConfigError(f"data.synthetic.n_items ({syn.n_items}) must be >= n_categories ({syn.n_categories}) >= 1")
    if not 2 <= syn.min_seq_len <= syn.max_seq_len:
        raise ConfigError(f"data.synthetic.min_seq_len/max_seq_len: need 2 <= min <= max, got {syn.min_seq_len}, {syn.max_seq_len}")
    if not 0.0 <= syn.stay_prob <= 1.0:
        raise ConfigError(f"data.synthetic.stay_prob: must be in [0, 1], got {syn.stay_prob}")
    if syn.n_users < 1:
        raise ConfigError(f"data.synthetic.n_users: must be >= 1, got {syn.n_users}")


def _category_name(cat: int, n_categories: int) -> str:
    name = VOCAB[cat % len(VOCAB)][0]
    return name if cat < len(VOCAB) else f"{name} {cat // len(VOCAB) + 1}"


def _item_text(rng: np.random.Generator, cat: int, n_categories: int) -> tuple[str, str, str]:
    """One item's title, description and brand from its category's vocabulary."""
    name, brands, adjs, materials, nouns, sizes, packs, uses = VOCAB[cat % len(VOCAB)]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    brand, adj, material, noun, size, pack = pick(brands), pick(adjs), pick(materials), pick(nouns), pick(sizes), pick(packs)
    model = f"{brand[:2].upper()}{int(rng.integers(100, 1000))}{'ABCDEFGHJKLMNPRSTUVWXYZ'[int(rng.integers(23))]}"
    series = f" Series {cat // len(VOCAB) + 1}" if cat >= len(VOCAB) else ""
    title = f"{brand} {model} {adj} {material} {noun}{series}, {size} ({pack})"
    fields = {"Adj": adj, "noun": noun, "noun_l": noun.lower(), "material": material, "use": pick(uses), "Brand": brand,
              "category_l": _category_name(cat, n_categories).lower(), "pack": pack.lower()}
    k = int(rng.integers(2, len(DESCRIPTIONS) + 1))
    desc = " ".join(DESCRIPTIONS[i].format(**fields) for i in sorted(rng.choice(len(DESCRIPTIONS), size=k, replace=False)))
    return title, desc, brand
