"""`python -m report`: tables, figures and the executed notebook from the records (report.build)."""
from report.build import main

if __name__ == "__main__":
    raise SystemExit(main())
