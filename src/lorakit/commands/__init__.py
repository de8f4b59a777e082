"""One module per ``lorakit`` subcommand (discovered by ``lorakit.cli``)."""
