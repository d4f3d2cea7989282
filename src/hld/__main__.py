from hld.cli import main

raise SystemExit(main())
