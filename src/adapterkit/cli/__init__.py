"""The ``adapterkit`` command-line tool."""
