//! Plain aligned tables for terminal output.

/// A table of text cells with a header row.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        Self { header: header.iter().map(|s| (*s).to_owned()).collect(), rows: Vec::new() }
    }

    /// Adds a row; cells beyond the header's width are dropped.
    pub fn row<const N: usize>(&mut self, cells: [&str; N]) {
        self.rows.push(cells.iter().take(self.header.len()).map(|s| (*s).to_owned()).collect());
    }

    /// Renders with the header.
    pub fn render(&self) -> String {
        self.render_rows(true)
    }

    /// Renders without the header (key/value listings).
    pub fn render_plain(&self) -> String {
        self.render_rows(false)
    }

    fn render_rows(&self, header: bool) -> String {
        let all: Vec<&Vec<String>> = header.then_some(&self.header).into_iter().chain(&self.rows).collect();
        let mut widths = vec![0; self.header.len()];
        for row in &all {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in all {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(["A", "LONGER"]);
        t.row(["xyz", "1"]);
        assert_eq!(t.render(), "A     LONGER\nxyz   1\n");
        assert_eq!(t.render_plain(), "xyz   1\n");
    }
}
