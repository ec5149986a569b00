"""Installing a supervisor as a user service: `overnight install | uninstall | services`."""
