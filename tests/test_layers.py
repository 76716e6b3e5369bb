"""No import circle anywhere in the package (import-linter's layers cover the packages; this, every module)."""

from __future__ import annotations

import grimp


def test_no_module_imports_one_that_imports_it_back():
    graph = grimp.build_graph("flowlens_ingest")
    circles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if imported != module and graph.find_shortest_chain(importer=imported, imported=module)
        }
    )
    assert circles == []
