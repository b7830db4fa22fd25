"""Fast paths, one op per file, each tested against moekit.functional."""
