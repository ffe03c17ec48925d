from rankwarden.cli import main

raise SystemExit(main())
