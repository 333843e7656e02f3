//! A minimal aligned-column table for terminal output.
//!
//! Cells come from the server, so control characters are escaped: a volume named
//! `"\x1b[2J"` must not clear the operator's terminal.

/// Where a column's cells sit within its width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    /// For numbers, so digits line up.
    Right,
}

/// Columns separated by two spaces, a header row, no trailing whitespace.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

const GAP: &str = "  ";

impl Table {
    pub fn new(headers: &[(&str, Align)]) -> Self {
        Self {
            headers: headers
                .iter()
                .map(|(name, align)| ((*name).to_owned(), *align))
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty and extra cells are dropped.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len(), "row width");
        let mut row: Vec<String> = row.into_iter().map(|cell| sanitize(&cell)).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(col, (header, _))| {
                self.rows
                    .iter()
                    .map(|row| width(&row[col]))
                    .chain([width(header)])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let header: Vec<&str> = self.headers.iter().map(|(h, _)| h.as_str()).collect();
        self.render_row(&mut out, &header, &widths);
        for row in &self.rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            self.render_row(&mut out, &cells, &widths);
        }
        out
    }

    fn render_row(&self, out: &mut String, cells: &[&str], widths: &[usize]) {
        let mut line = String::new();
        for (col, cell) in cells.iter().enumerate() {
            if col > 0 {
                line.push_str(GAP);
            }
            let pad = widths[col].saturating_sub(width(cell));
            match self.headers[col].1 {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Display width, approximated by `char`s: names are expected to be ASCII, and a wrong
/// width only misaligns a column.
fn width(text: &str) -> usize {
    text.chars().count()
}

fn sanitize(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_owned();
    }
    cell.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_spaces() {
        let mut table = Table::new(&[
            ("NAME", Align::Left),
            ("SIZE", Align::Right),
            ("PATH", Align::Left),
        ]);
        table.push(vec!["vol0".into(), "10.0 GiB".into(), "/a".into()]);
        table.push(vec!["scratch-volume".into(), "512 B".into(), "".into()]);
        assert_eq!(
            table.render(),
            "NAME                SIZE  PATH\n\
             vol0            10.0 GiB  /a\n\
             scratch-volume     512 B\n"
        );
    }

    #[test]
    fn header_only_when_empty() {
        let table = Table::new(&[("ID", Align::Right), ("NAME", Align::Left)]);
        assert_eq!(table.render(), "ID  NAME\n");
    }

    #[test]
    fn wide_header_sets_the_width() {
        let mut table = Table::new(&[("CONNECTIONS", Align::Right), ("X", Align::Left)]);
        table.push(vec!["3".into(), "y".into()]);
        assert_eq!(table.render(), "CONNECTIONS  X\n          3  y\n");
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut table = Table::new(&[("NAME", Align::Left)]);
        table.push(vec!["evil\u{1b}[2J\nname".into()]);
        let out = table.render();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains('\u{1b}'));
        assert!(out.contains("evil\\u{1b}[2J\\nname"));
    }
}
