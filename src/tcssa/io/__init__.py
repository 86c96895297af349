"""Every on-disk format of tcssa, in one place: what is read from or written to a file goes through here."""
