"""Small fixed word lists for keys, names and places (written for this project)."""
from __future__ import annotations

ADJECTIVES: tuple[str, ...] = tuple(
    """amber ancient bitter bold brave bright brisk calm clever cold copper crimson curious
    dusty eager early fading fierce gentle golden grand hidden hollow humble icy jagged
    keen lively lonely lucky marble mellow misty modest narrow noble pale patient plain
    polished quiet rapid restless rusty sacred scarlet shy silent silver slender smoky
    solemn sturdy sudden swift tame tender thorny tidy timid velvet violet wandering warm
    wild windy wise wooden young""".split()
)

NOUNS: tuple[str, ...] = tuple(
    """anchor badger beacon bridge candle canyon cedar comet compass crane crater dagger
    falcon feather fern garden glacier harbor hazel heron island kettle ladder lantern
    ledger lichen maple meadow mirror mitten orchard otter pebble pepper pillar pine
    quarry quill raven ribbon river saddle shelter sparrow spindle summit thistle thunder
    tower tulip valley violin walnut willow window wren yarrow zephyr basket bellows cobble""".split()
)

FIRST_NAMES: tuple[str, ...] = tuple(
    """Adela Bertram Cordelia Dorian Elspeth Fenwick Griselda Horatio Isolde Jasper Kestrel
    Leopold Marisol Nathaniel Ottilie Percival Quentin Rosalind Sebastian Theodora Ulric
    Veronica Wendell Ximena Yorick Zenobia Ambrose Beatrix Cassius Delphine Edmund Florian
    Gwendolyn Hyacinth Ignatius Juniper""".split()
)

LAST_NAMES: tuple[str, ...] = tuple(
    """Ashcombe Brightwater Carrow Dunmore Ellery Fairbanks Galloway Hawthorne Ingram
    Jessop Kilbride Lockhart Merriweather Northcott Oakhurst Pemberton Quimby Ravensworth
    Stanhope Thistlewood Underhill Vance Whitlock Yardley Ashdown Blackwood Cresswell
    Davenport Fenwright Greaves""".split()
)

PLACE_HEADS: tuple[str, ...] = tuple("Marrow Tilling Ash Bram Cold Elder Fox Gal Hart Kes Lang Mor Nor Pen Quar Red Sel Thorn Wick Yel".split())
PLACE_TAILS: tuple[str, ...] = tuple("by ford wick stead mouth bury holme thorpe field ridge haven combe".split())
ORG_KINDS: tuple[str, ...] = tuple("Society Guild Observatory Library Foundation Academy Museum Institute Conservatory Archive".split())
