"""Offline builder: pair files + images -> ASIF index folder (see `asif build --help`)."""
