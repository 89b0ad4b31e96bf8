"""Getting a kernel into guest RAM and the boot vCPU to its entry point."""
