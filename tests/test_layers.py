"""The import order of the packages (setup.cfg's [importlinter] contract) and no import cycle
between any two modules of the project, lazy imports inside functions included."""
import configparser
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def layers() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["importlinter:contract:layers"]["layers"].split()


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*layers(), include_external_packages=False, cache_dir=None)


def test_the_order_is_declared_once_and_covers_every_package():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(layers()) == packages - {"tests"}, "every package of the project has its place in the order"


def test_no_import_goes_up(graph):
    order = layers()
    upward = []
    for low_index, low in enumerate(order):
        for high in order[:low_index]:
            for module in graph.find_descendants(low) | {low}:
                for imported in graph.find_modules_directly_imported_by(module):
                    if imported == high or imported.startswith(high + "."):
                        for detail in graph.get_import_details(importer=module, imported=imported):
                            upward.append(f"{module.replace('.', '/')}.py:{detail['line_number']}: "
                                          f"{detail['line_contents']}  ({low} is below {high})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_cycle(graph):
    modules = sorted(m for p in layers() for m in graph.find_descendants(p) | {p})
    cycles = set()
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.add(" -> ".join((module,) + tuple(back)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))
