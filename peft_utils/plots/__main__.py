"""``python -m peft_utils.plots RESULTS_DIR IMGS_DIR``: regenerate every figure from saved run records."""
from peft_utils.plots import main

raise SystemExit(main())
