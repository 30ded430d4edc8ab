from mpirt.cli import main

raise SystemExit(main())
