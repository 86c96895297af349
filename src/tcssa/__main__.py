from tcssa.cli import main

raise SystemExit(main())
