"""The shared kernel: config, the directory database (domains, users, aliases), file-system safety."""
