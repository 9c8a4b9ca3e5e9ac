"""Weight-edit files: our ``.diff`` format (``diff_file``), safe tensor containers (``containers``), reading
every accepted format (``read``), the UNet an edit targets (``target``) and conversion/merge (``export``)."""
